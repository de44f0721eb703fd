"""kernels/entry.py: the cached launcher where it takes the call, the kernel's JIT entry otherwise."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")

from fusegraph.kernels import entry, launch, reference  # noqa: E402

pytestmark = pytest.mark.triton


def test_cpu_tensors_take_the_jit_entries(device, check):
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((5, 48)).astype(np.float32) for _ in range(2))
    g, b = (rng.standard_normal(48).astype(np.float32) for _ in range(2))
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    check(entry.rms_norm(t(x), t(g), 1e-6), reference.rms_norm(x, g, 1e-6), "float32")
    y, s = entry.layer_norm(t(x), t(g), t(b), 1e-5, residual=t(r))
    check(y, reference.layer_norm(x + r, g, b, 1e-5), "float32")
    check(s, x + r, "float32")
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(2))
    check(entry.attention(t(q), t(k), t(v)), reference.attention(q, k, v, compute_dtype=np.float64), "float32")


def test_launchable_tensors_take_the_cached_launcher(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "takes_tensors", lambda *ts: True)
    monkeypatch.setattr(launch, "dtype_name", lambda t: "float32")
    monkeypatch.setattr(launch, "current_stream", lambda t: 0)
    monkeypatch.setattr(launch, "launch_norm", lambda *a, **kw: calls.append(("norm", a[-3])))
    monkeypatch.setattr(launch, "launch_attention", lambda *a, **kw: calls.append(("attention", a[7])))
    x = torch.zeros(3, 8)
    entry.rms_norm(x, torch.ones(8))
    entry.layer_norm(x, torch.ones(8), torch.zeros(8), residual=x)
    entry.attention(torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))
    assert calls == [("norm", "float32"), ("norm", "float32"), ("attention", 1)]
