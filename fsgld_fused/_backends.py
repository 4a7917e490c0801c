"""The one place that maps (backend name, device, dtype) to kernels.

Every backend exposes the same three list operations as `fsgld_fused.reference`
(`perturb_`, `restore_`, `fused_step_`, same signatures), so the optimizer never branches on
which one runs. A backend that is not usable here says why, and `FSGLD` quotes that reason.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from typing import Any, Callable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Low-precision kernels do their math in float32 (float64 params keep float64 in the reference).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

BACKENDS = ("reference", "cpu", "cuda", "triton")
# "auto" takes the first usable entry for the device type, except that between cuda and triton
# it takes the one measured faster on this device (see resolve); an explicit name always wins.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Any  # has perturb_, restore_, fused_step_ with the reference's signatures
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.device_types and dtype in self.dtypes


def _load_reference() -> Backend:
    from . import reference

    return Backend("reference", reference, ("cpu", "cuda"), FLOAT_DTYPES)


def _load_cpu() -> Backend:
    from . import _ops

    _ops.require_extension()
    return Backend("cpu", _ops.cpu_ops, ("cpu",), FLOAT_DTYPES)


def _load_cuda() -> Backend:
    from . import _ops

    _ops.require_extension(cuda=True)
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible to torch")
    return Backend("cuda", _ops.cuda_ops, ("cuda",), KERNEL_DTYPES)


def _load_triton() -> Backend:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        raise RuntimeError("Triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        from .kernels import triton_ops
    except ImportError as exc:  # triton missing, or a kernels/ import error
        raise RuntimeError(f"the Triton kernels could not be imported ({exc})") from exc
    devices = ("cuda", "cpu") if interpret else ("cuda",)
    return Backend("triton", triton_ops, devices, KERNEL_DTYPES)  # the kernels draw the signs themselves


_LOADERS: dict[str, Callable[[], Backend]] = {
    "reference": _load_reference,
    "cpu": _load_cpu,
    "cuda": _load_cuda,
    "triton": _load_triton,
}


_PROBED: dict[str, tuple[Optional[Backend], Optional[str]]] = {}


def _probe(name: str) -> tuple[Optional[Backend], Optional[str]]:
    """(backend, None) if usable here, else (None, why not); loaded once (a plain dict, which
    torch.compile traces through, where it would warn about an lru_cache)."""
    if name not in _PROBED:
        try:
            _PROBED[name] = (_LOADERS[name](), None)
        except Exception as exc:  # noqa: BLE001 - the reason is reported to the user verbatim
            _PROBED[name] = (None, str(exc) or type(exc).__name__)
    return _PROBED[name]


def available_backends() -> dict[str, Optional[str]]:
    """{name: None if usable here, else the reason it is not}."""
    return {name: _probe(name)[1] for name in BACKENDS}


def check_backend_name(name: str) -> None:
    """Refuse an unknown or unusable backend at construction, naming the usable ones."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {BACKENDS}")
    reason = _probe(name)[1]
    if reason is not None:
        usable = [n for n, r in available_backends().items() if r is None]
        raise ValueError(f"backend {name!r} is not available here: {reason}. Available: {usable}")


# "auto" on CUDA: whichever of cuda / triton measured faster for (device index, dtype), timed
# once on scratch tensors and cached; set_auto_backend overrides it.
_AUTO_CHOICE: dict[tuple[Optional[int], torch.dtype], str] = {}


def set_auto_backend(name: Optional[str], device: Any = "cuda", dtype: Optional[torch.dtype] = None) -> None:
    """Make backend="auto" use `name` on `device` (for `dtype`, or every kernel dtype); None forgets."""
    device = torch.device(device)
    if name is not None:
        check_backend_name(name)
    for dt in (dtype,) if dtype is not None else KERNEL_DTYPES:
        key = (device.index, dt)
        if name is None:
            _AUTO_CHOICE.pop(key, None)
        else:
            _AUTO_CHOICE[key] = name


def measure_step_seconds(backend: Backend, device: torch.device, dtype: torch.dtype, numel: int = 1 << 24) -> float:
    """Median time of one fused step over `numel` scratch elements in 8 tensors."""
    params = [torch.randn(numel // 8, device=device).to(dtype) for _ in range(8)]
    grads = [torch.randn_like(p) for p in params]
    ids = list(range(8))

    def step():
        backend.ops.fused_step_(params, grads, [], ids, 1, 0, 1e-6, 0.0, 0.0, 1e-6, 1e-6, 1e-6)

    from .baselines import median, time_fn

    return median(time_fn(step, device, warmup=1, repeat=5))


def _fastest(names: list[str], device: torch.device, dtype: torch.dtype) -> str:
    key = (device.index, dtype)
    if key not in _AUTO_CHOICE:
        on_gpu = device.type == "cuda" and torch.cuda.is_available()
        if on_gpu and torch.cuda.is_current_stream_capturing():
            return names[0]  # no timing inside a CUDA-graph capture: the first choice, not cached
        with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():  # scratch and syncs on its GPU
            timed = {n: measure_step_seconds(_probe(n)[0], device, dtype) for n in names}
        _AUTO_CHOICE[key] = min(timed, key=timed.get)
    return _AUTO_CHOICE[key]


def _usable(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    candidates = AUTO_ORDER.get(device.type, ("reference",)) if name == "auto" else (name,)
    usable = []
    for cand in candidates:
        backend, _ = _probe(cand)
        if backend is not None and backend.supports(device, dtype):
            usable.append(cand)
    return usable


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs a (device, dtype) bucket of a group whose backend is `name`."""
    usable = _usable(name, device, dtype)
    if name == "auto" and "cuda" in usable and "triton" in usable:
        return _probe(_fastest(["cuda", "triton"], device, dtype))[0]
    if usable:
        return _probe(usable[0])[0]
    raise ValueError(
        f"backend {name!r} cannot run {dtype} parameters on {device.type}"
        + ("" if name == "auto" else "; use backend='auto' or 'reference'")
    )


def describe(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """What runs a (device, dtype) bucket, without timing anything (for repr)."""
    usable = _usable(name, device, dtype)
    if name == "auto" and "cuda" in usable and "triton" in usable:
        chosen = _AUTO_CHOICE.get((device.index, dtype))
        return chosen or "cuda or triton, timed at the first step"
    return usable[0] if usable else f"none for {dtype} on {device.type}"
