"""The compiled extension (csrc/): loading it, fake kernels for torch.compile, and the Python
face of its `torch.ops.fsgld` ops with the same signatures as `fsgld_fused.reference`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .reference import PERTURB_OP, RESTORE_OP

_EXT_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.fsgld.*)
except ImportError as exc:  # not built: the "cpu"/"cuda" backends report this reason
    _C = None
    _EXT_ERROR = f"the C++ extension fsgld_fused._C is not built ({exc}); run: pip install --no-build-isolation -e ."


def require_extension(cuda: bool = False) -> None:
    if _C is None:
        raise RuntimeError(_EXT_ERROR)
    if cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("fsgld::fused_step_", "CUDA"):
        raise RuntimeError("fsgld_fused._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)")


if _C is not None:
    # The ops only mutate their inputs: under FakeTensor tracing there is nothing to compute.
    for _name in ("perturb_", "fused_step_", "normals_", "philox_words_"):
        torch.library.register_fake(f"fsgld::{_name}")(lambda *args, **kwargs: None)


def _seed_arg(seed: int) -> int:
    """The 64-bit seed as the int64 with the same bits (schemas take signed ints)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _offsets(params, offsets):
    return [0] * len(params) if offsets is None else list(offsets)


class ExtensionOps:
    """perturb_ / restore_ / fused_step_ on torch.ops.<namespace> (the dispatcher picks CPU or CUDA).

    `namespace` is "fsgld"; the tests also bind it to the CPU emulation of the CUDA kernels, which
    defines the same schemas under another name (tests/cuda_emulation.cpp).
    """

    def __init__(self, namespace: str = "fsgld"):
        self.lib = getattr(torch.ops, namespace)

    def perturb_(self, params, param_ids, seed, step, sigma, offsets=None, masters: Sequence[torch.Tensor] = (),
                 step_t=None, rademacher=False, stochastic_rounding=False, _op=PERTURB_OP):
        self.lib.perturb_(list(params), list(masters), list(param_ids), _offsets(params, offsets),
                          _seed_arg(seed), step, sigma, step_t, rademacher, _op if stochastic_rounding else -1)

    def restore_(self, params, param_ids, seed, step, sigma, offsets=None, masters: Sequence[torch.Tensor] = (),
                 step_t=None, rademacher=False, stochastic_rounding=False):
        if masters:  # the master is the clean weight: copying it back is the exact restore
            torch._foreach_copy_(list(params), list(masters))
            return
        self.perturb_(params, param_ids, seed, step, -sigma, offsets, step_t=step_t, rademacher=rademacher,
                      stochastic_rounding=stochastic_rounding, _op=RESTORE_OP)

    def fused_step_(self, params, grads, momentum_buffers, param_ids, seed, step, lr, weight_decay, momentum,
                    noise_std, restore_sigma, perturb_sigma, offsets=None, masters: Sequence[torch.Tensor] = (),
                    grad_scale=None, found_inf=None, step_t=None, lr_t=None, restore_rademacher=False,
                    perturb_rademacher=False, stochastic_rounding=False):
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        self.lib.fused_step_(list(params), grads, list(momentum_buffers), list(masters), list(param_ids),
                             _offsets(params, offsets), _seed_arg(seed), step, lr, weight_decay, momentum,
                             noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, step_t, lr_t,
                             restore_rademacher, perturb_rademacher, stochastic_rounding)

    def normals(self, seed, pid, step, kind, numel, offset=0, device="cpu"):
        out = torch.empty(numel, dtype=torch.float32, device=device)
        self.lib.normals_(out, _seed_arg(seed), pid, step, kind, offset)
        return out

    def philox_words(self, seed, pid, step, kind, first_block, nblocks, device="cpu"):
        out = torch.empty(nblocks, 4, dtype=torch.int32, device=device)
        self.lib.philox_words_(out, _seed_arg(seed), pid, step, kind, first_block)
        return out


# One object for both devices: the dispatcher routes on the tensors' device.
cpu_ops = cuda_ops = ExtensionOps()
