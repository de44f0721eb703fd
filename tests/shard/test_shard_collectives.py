"""The collectives: their reference semantics (what the lock-step runner does), and the NCCL
plugin core's `enqueue` — pointer arithmetic, the inner-axis staging through the workspace — run
on host memory with a fake NCCL group (one thread per rank, meeting at a barrier as NCCL's ranks
meet), checked against that reference. On GPUs the same enqueue is checked through nccl4py by
benchmarks/bench_collectives.py (benchmarks/RESULTS.md)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from fusegraph.ops import collectives
from fusegraph.plugins import collectives as plugin


def test_reference_semantics():
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * r for r in range(3)]
    ar = collectives.make_node("AllReduce", "x", "y", 3, name="ar")
    assert all((y == xs[0] + xs[1] + xs[2]).all() for y in collectives.reference(ar, xs))
    mx = collectives.make_node("AllReduce", "x", "y", 3, name="mx", reduction="max")
    assert (collectives.reference(mx, xs)[1] == xs[2]).all()
    ag = collectives.make_node("AllGather", "x", "y", 3, name="ag", axis=1)
    assert collectives.reference(ag, xs)[0].shape == (2, 9)
    assert (collectives.reference(ag, xs)[2][:, 3:6] == xs[1]).all()
    rs = collectives.make_node("ReduceScatter", "x", "y", 3, name="rs", axis=1)
    pieces = collectives.reference(rs, xs)
    assert [p.shape for p in pieces] == [(2, 1)] * 3
    assert (np.concatenate(pieces, axis=1) == sum(xs)).all()


def test_reference_refuses_a_wrong_group():
    ar = collectives.make_node("AllReduce", "x", "y", 4, name="ar")
    with pytest.raises(ValueError, match="group_size 4, but 2 ranks"):
        collectives.reference(ar, [np.zeros(2), np.zeros(2)])


class FakeWorld:
    """NCCL's semantics over host pointers: each rank's thread posts its buffers, all meet, each
    reads the others' send buffers, all meet again."""

    def __init__(self, n):
        self.n, self.posted, self.barrier = n, [None] * n, threading.Barrier(n)

    def group(self, rank):
        world = self

        class Group:
            def _run(self, send, recv, count, dtype, combine):
                size = plugin.ITEMSIZE[dtype]
                world.posted[rank] = (send, count)
                world.barrier.wait()
                arrays = [np.frombuffer((ctypes.c_char * (c * size)).from_address(p), dtype=dtype).copy()
                          for p, c in world.posted]
                world.barrier.wait()
                out = combine(arrays)
                ctypes.memmove(recv, out.ctypes.data, out.nbytes)

            def all_reduce(self, send, recv, count, dtype, op, stream):
                self._run(send, recv, count, dtype, lambda a: collectives.REDUCTIONS[op].reduce(np.stack(a)))

            def all_gather(self, send, recv, count, dtype, stream):
                self._run(send, recv, count, dtype, np.concatenate)

            def reduce_scatter(self, send, recv, count, dtype, op, stream):
                self._run(send, recv, count * world.n, dtype,
                          lambda a: np.split(collectives.REDUCTIONS[op].reduce(np.stack(a)), world.n)[rank])

        return Group()


def host_copy_2d(dst, dst_pitch, src, src_pitch, width, height, stream):
    for row in range(height):
        ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)


@pytest.mark.parametrize("op, axis, shape", [
    ("AllReduce", 0, (3, 5)), ("AllGather", 0, (2, 3)), ("AllGather", 1, (2, 3, 4)), ("AllGather", 2, (2, 3, 4)),
    ("ReduceScatter", 0, (4, 3)), ("ReduceScatter", 1, (3, 8, 2)), ("ReduceScatter", 2, (2, 3, 8))])
@pytest.mark.parametrize("world", [2, 4])
def test_plugin_enqueue_matches_the_reference(monkeypatch, op, axis, shape, world):
    monkeypatch.setattr(plugin, "_copy_2d", host_copy_2d)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(world)]
    node = collectives.make_node(op, "x", "y", world, name=op, axis=None if op == "AllReduce" else axis)
    expected = collectives.reference(node, inputs)
    fake = FakeWorld(world)
    results, errors = [None] * world, []

    def rank(r):
        try:
            core = plugin.CollectiveCore(op, world, "sum", axis, group=fake.group(r))
            y = np.zeros(core.output_shape(shape), np.float32)
            ws = np.zeros(max(core.workspace_bytes(shape, "float32"), 1), np.uint8)
            core.enqueue(shape, "float32", inputs[r].ctypes.data, y.ctypes.data, ws.ctypes.data, 0)
            results[r] = y
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in range(world):
        np.testing.assert_allclose(results[r], expected[r], rtol=1e-6, atol=1e-6)


def test_core_shapes_and_refusals():
    core = plugin.CollectiveCore("AllGather", 4, axis=-1)
    assert core.output_shape((2, 3)) == (2, 12)
    assert core.workspace_bytes((2, 3), "float16") == 2 * 12 * 2
    assert plugin.CollectiveCore("AllGather", 4, axis=0).workspace_bytes((2, 3), "float32") == 0
    with pytest.raises(ValueError, match="does not divide by 4"):
        plugin.CollectiveCore("ReduceScatter", 4, axis=1).output_shape((2, 6))
    with pytest.raises(ValueError, match="reduction 'avg'"):
        plugin.CollectiveCore("AllReduce", 2, "avg")
    with pytest.raises(ValueError, match="not a collective"):
        plugin.CollectiveCore("Broadcast", 2)


def test_group_from_env_refuses_a_mismatched_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(plugin.NcclGroup, "_by_size", {})
    with pytest.raises(RuntimeError, match="over 4 ranks, but WORLD_SIZE is 2"):
        plugin.NcclGroup.from_env(4)
