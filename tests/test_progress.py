"""The package's progress bars must not write warnings into the book's cells."""
import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")


def test_import_in_a_notebook_writes_nothing_to_stderr():
    # tqdm.auto warns (TqdmWarning on stderr) inside a Jupyter kernel without ipywidgets; every chapter
    # imports minisparse in its first cell, so the warning would show on every page of the rendered book
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import minisparse\nfrom minisparse._progress import tqdm\n"
                                          "print(tqdm.__module__)")]
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    outputs = nb.cells[0].outputs
    assert [o for o in outputs if o.get("name") == "stderr"] == []
    assert any("tqdm" in o.get("text", "") for o in outputs if o.get("name") == "stdout")
