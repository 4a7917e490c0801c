"""fsgld-fused: flatness-aware SGLD (arXiv 2510.02174) at the per-step cost of plain SGD."""

from . import reference
from ._backends import available_backends, set_auto_backend
from .optimizer import FSGLD, TemperatureWarning, coupled_sigma

__all__ = ["FSGLD", "TemperatureWarning", "available_backends", "coupled_sigma", "reference", "set_auto_backend"]
__version__ = "0.1.0"
