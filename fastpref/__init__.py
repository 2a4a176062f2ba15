"""fastpref: fused kernels and a lean trainer for preference, ranking and contrastive training."""

import torch  # noqa: F401  (loads libtorch before fastpref._C)

from fastpref import losses  # noqa: E402  (fastpref.losses reachable after `import fastpref`)
from fastpref.ops import *  # noqa: F403  (the public fused ops)
from fastpref.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = [*_ops_all, "__version__", "losses"]
