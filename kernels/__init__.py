"""Triton kernels of fsgld-fused, installed as `fsgld_fused.kernels`."""
