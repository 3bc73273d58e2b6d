"""minisparse: pruning large language models by optimization."""
from .methods import SolverResult, available_methods, get_method, register
from .objective import dampen, gram, layer_error, reconstruct, relative_error
from .patterns import Pattern, is_feasible, num_pruned, parse_pattern, project, sparsity_of, topk_mask
from . import greedy
from .greedy import magnitude

__version__ = "0.1.0"
