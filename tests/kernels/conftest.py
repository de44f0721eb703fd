"""Kernel tests run in the Triton interpreter unless a CUDA GPU is present.

TRITON_INTERPRET must be set before ``fusegraph.kernels`` modules are imported (the
``@triton.jit`` decorator reads it), so it is set here, at collection time.
"""

import os

import numpy as np
import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device():
    """Where the kernels run: 'cuda' on a GPU machine, else 'cpu' (the interpreter)."""
    return "cuda" if _has_cuda() else "cpu"


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` fails any bound."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# fp16 operands and outputs round at 2^-11 relative; fp32 (interpreter dots are exact fp32)
TOL = {"float32": 1e-5, "float16": 2e-3}


@pytest.fixture(scope="session")
def check():
    def _check(out, ref, dtype_name, what=""):
        err = rel_err(out.detach().float().cpu().numpy(), ref)
        bound = TOL[dtype_name]
        if dtype_name == "float32" and out.is_cuda:
            # Triton's fp32 dots use tf32 on the GPU (operands rounded to 2^-11): ~1e-3 for a
            # single product at K=1, amplified up to ~3x by Silu/Sigmoid near their tails
            bound = 5e-3
        assert err < bound, f"{what} relative error {err:.3e} >= {bound:.0e}"
    return _check
