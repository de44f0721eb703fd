"""fusegraph.shard on generated Llama-like graphs: valid rank models that compute the original
in lock step, at TP 1/2/4/8 (hypothesis over the model's shape), with 1/N of each sharded weight
per rank; and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusegraph
from fusegraph.ops import collectives
from fusegraph.errors import InputError
from fusegraph.verify.lockstep import LockstepRunner, verify_shards
from fusegraph.sharding import Sharder, _weight_bytes
from llama_like import Config, build, configs


def check_sharded(model: onnx.ModelProto, tp: int, fused: bool = False):
    if fused:
        model = fusegraph.rewrite(model)
    sharder = Sharder(model, tp)
    ranks = [sharder.rank_model(r) for r in range(tp)]
    for rank in ranks:
        onnx.checker.check_model(rank, full_check=True)
        assert [i.name for i in rank.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in rank.graph.output] == [o.name for o in model.graph.output]
    diffs = verify_shards(model, ranks)
    assert all(d.ok for d in diffs), diffs
    report = sharder.report()
    # each rank: 1/tp of every sharded weight, every replicated one whole, and only the rank's
    # constants besides (the embedding's zero row, slice bounds: under 1% here)
    for rank in ranks:
        extra = _weight_bytes(rank) - (report.sharded_bytes / tp + report.replicated_bytes)
        assert 0 <= extra <= 0.01 * (report.sharded_bytes + report.replicated_bytes) + 2048, extra
    return sharder, ranks, report


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@settings(max_examples=4)
@given(data=st.data())
def test_llama_like_graphs_shard_and_compute_the_original(tp, data):
    config = data.draw(configs(tp))
    model = build(config, seed=data.draw(st.integers(0, 3)))
    sharder, ranks, report = check_sharded(model, tp)
    layers = config.layers
    # every projection of every layer shards: Q/K/V (K, V only when there are KV heads enough),
    # gate/up column-parallel; o/down row-parallel; the LM head vocabulary-parallel
    kv_split = config.kv_heads % tp == 0
    assert report.row == 2 * layers
    assert report.column == layers * (3 + (2 if kv_split else 0)) + config.lm_head
    assert report.embeddings == 1
    calls = [n.op_type for n in ranks[0].graph.node if collectives.is_collective(n)]
    assert calls.count("AllReduce") == 2 * layers + 1
    assert calls.count("AllGather") == int(config.lm_head)
    assert all(collectives.attributes(n)["group_size"] == tp for n in ranks[0].graph.node if collectives.is_collective(n))


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_llama_like_graph_shards_as_units(tp):
    """After `rewrite`: the fused QKV MatMul splits per segment, SwiGLU is one column-parallel
    unit, attention and RoPE carry the heads axis."""
    model = build(Config(layers=2, heads=8, kv_heads=2, ffn=64, vocab=64, dynamic=True, qkv_bias=True))
    fused = fusegraph.rewrite(model)
    kinds = {n.op_type for n in fused.graph.node}
    assert {"SwiGLU", "Split"} <= kinds
    sharder, ranks, report = check_sharded(fused, tp)
    split = next(n for n in ranks[0].graph.node if n.op_type == "Split")
    sizes = onnx.numpy_helper.to_array(next(t for t in ranks[0].graph.initializer if t.name == split.input[1]))
    heads_kv = 2 // tp if tp <= 2 else 2  # K/V split while there are KV heads enough, else kept whole
    assert sizes.tolist() == [64 // tp, heads_kv * 8, heads_kv * 8]


def test_few_kv_heads_are_replicated_and_sliced_per_rank():
    """4 query heads over 1 KV head at TP 4: K/V stay whole (reported), each rank slices the one
    KV head; Q/O, the MLP and the embedding still shard."""
    model = build(Config(heads=4, kv_heads=1, ffn=32, vocab=32))
    sharder, ranks, report = check_sharded(model, 4)
    assert set(report.replicated.values()) == {
        "Reshape 'reshape_27_node': 1 head (axis 2 of [2,5,1,8]), fewer than tp 4: kept whole on every rank",
        "Reshape 'reshape_30_node': 1 head (axis 2 of [2,5,1,8]), fewer than tp 4: kept whole on every rank"}
    assert report.column == 3 + 1 and report.row == 2


def test_tp_one_is_the_original_with_groups_of_one():
    model = build(Config())
    sharder, ranks, report = check_sharded(model, 1)
    assert _weight_bytes(ranks[0]) >= _weight_bytes(model)


@pytest.mark.parametrize("config, tp, message", [
    (Config(heads=3, kv_heads=3, hidden=24, ffn=32, vocab=32), 2, "3 groups (heads)"),
    (Config(heads=6, kv_heads=6, ffn=48, vocab=48), 4, "6 groups (heads)"),
])
def test_heads_that_do_not_split_are_refused(config, tp, message):
    with pytest.raises(InputError, match=r"cannot shard over tp .*" + message.replace("(", r"\(").replace(")", r"\)")):
        Sharder(build(config), tp)


def test_a_model_without_weights_to_split_is_refused():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(InputError, match="nothing to shard over tp 2"):
        Sharder(model, 2)


@pytest.mark.parametrize("tp", [0, -1])
def test_tp_must_be_positive(tp):
    with pytest.raises(InputError, match="positive integer"):
        Sharder(build(Config()), tp)


def test_norm_over_a_sharded_axis_backs_the_seed_off():
    """A column-parallel projection whose output is normalized (a reduction over its columns)
    cannot stay split: the projection is replicated, with the reason, and the rest shards."""
    model = build(Config(lm_head=False))
    g = model.graph
    # hidden -> MatMul (column seed candidate) -> ReduceMean over the last axis -> output
    w = onnx.numpy_helper.from_array(np.ones((32, 16), np.float32), "extra_w")
    g.initializer.append(w)
    g.node.extend([onnx.helper.make_node("MatMul", ["hidden", "extra_w"], ["extra"], name="extra_proj"),
                   onnx.helper.make_node("ReduceMean", ["extra"], ["pooled"], name="pool", axes=[-1])])
    g.output.append(onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, [2, 5, 1]))
    sharder, ranks, report = check_sharded(model, 2)
    assert report.replicated == {"MatMul 'extra_proj'": "ReduceMean 'pool' reduces over the sharded axis"}


def test_runner_refuses_ranks_that_disagree_on_collectives():
    model = build(Config())
    sharder = Sharder(model, 2)
    r0, r1 = sharder.rank_model(0), sharder.rank_model(1)
    ar = next(n for n in r1.graph.node if collectives.is_collective(n))
    ar.attribute[0].i = 3
    with pytest.raises(InputError, match="same collectives"):
        LockstepRunner([r0, r1])


def test_a_wrong_weight_slice_is_caught():
    model = build(Config())
    sharder = Sharder(model, 2)
    r0, r1 = sharder.rank_model(0), sharder.rank_model(1)
    t = next(t for t in r1.graph.initializer if t.name.startswith("w_") and ".tp2" in t.name)
    a = onnx.numpy_helper.to_array(t).copy()
    a[0, 0] += 1.0
    t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    assert not all(d.ok for d in verify_shards(model, [r0, r1]))
