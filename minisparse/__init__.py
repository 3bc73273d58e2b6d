"""minisparse: pruning large language models by optimization.

The top half (patterns, objective, solvers) works on plain tensors W and G = X Xᵀ; the bottom half
(models, data, engine, evaluate, cli) applies the same solvers to real language models.
"""
from .methods import Method, SolverResult, available_methods, get_method, register
from .objective import dampen, gram, layer_error, reconstruct, relative_error
from .patterns import Pattern, is_feasible, num_pruned, parse_pattern, project, sparsity_of, topk_mask
from .greedy import magnitude, ria, sparsegpt, wanda
from .fw import sparsefw
from .models import BUNDLED, LoadedModel, cache_dir, decoder_layers, load_model, prunable_linears, save_checkpoint
from .data import TEXTS, calibration_batch, load_text, split_articles, tokenize, wikipedia_articles
from .engine import PruneReport, collect_grams, prune_model
from .evaluate import eval_windows, perplexity
from .lmeval import run_lm_eval
from .compress import load_compressed, save_compressed

__version__ = "0.1.0"

__all__ = [
    "Method", "SolverResult", "available_methods", "get_method", "register",
    "dampen", "gram", "layer_error", "reconstruct", "relative_error",
    "Pattern", "is_feasible", "num_pruned", "parse_pattern", "project", "sparsity_of", "topk_mask",
    "magnitude", "ria", "sparsegpt", "wanda", "sparsefw",
    "BUNDLED", "LoadedModel", "cache_dir", "decoder_layers", "load_model", "prunable_linears", "save_checkpoint",
    "TEXTS", "calibration_batch", "load_text", "split_articles", "tokenize", "wikipedia_articles",
    "PruneReport", "collect_grams", "prune_model",
    "eval_windows", "perplexity", "run_lm_eval",
    "load_compressed", "save_compressed",
]
