"""fsgld-fused: flatness-aware SGLD (arXiv 2510.02174) at the per-step cost of plain SGD."""

from . import reference
from ._backends import available_backends
from .optimizer import FSGLD, coupled_sigma

__all__ = ["FSGLD", "available_backends", "coupled_sigma", "reference"]
__version__ = "0.1.0"
