"""Properties of the rewriter on random graphs (fusegraph.verify.fuzz): validity, numerical equality,
idempotence, determinism, planted patterns fuse and decoys don't, and rule-order independence
(a stateful test).

Rule-order independence, precisely: (a) applying single rules in any order keeps the model
valid and numerically equal to the original; (b) if the rules applied have pairwise disjoint
match sets on the original (each rule's matched nodes, applying it alone) and none of them
matched a node another one made, the fused-op counts after applying them in any order equal the
sum of their counts applied alone. Overlapping rules (MatMul+Add vs MatMul+Add+Relu) are ordered
by priority, and chained ones (a residual Add + LayerNorm takes the LayerNormalization the
LayerNorm rule made; the GEMM epilogue takes the QKV rule's MatMul) compose, so only (a) holds
for them.
"""

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import event, given, note, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fusegraph import rewrite_with_report
from fusegraph.verify.fuzz import build_graph, graphs, planted
from fusegraph.patterns import all_rules
from fusegraph.verify import compare, make_inputs, run

RULES = list(all_rules())


def fused_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == "fusegraph")


def assert_equal_outputs(original, rewritten, feeds):
    diffs = compare(run(original, feeds), run(rewritten, feeds))
    assert all(d.ok for d in diffs), [d for d in diffs if not d.ok]


@given(graphs())
def test_rewrite_is_valid_equal_idempotent_and_deterministic(model):
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite_with_report(model)
    note(f"fusions: {dict(report.per_rule)}")
    event(f"dtype {onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)}")
    for fused in report.per_rule:
        event(f"fused {fused}")
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    feeds = make_inputs(model)
    assert_equal_outputs(model, out, feeds)
    again, report2 = rewrite_with_report(out)
    assert not report2.fusions
    assert again.graph.SerializeToString() == out.graph.SerializeToString()
    assert rewrite_with_report(model)[0].SerializeToString() == out.SerializeToString()


def _escapes(instance: dict, model: onnx.ModelProto) -> bool:
    """An intermediate of the planted instance is a graph output or is read outside it."""
    inside = set(instance["values"])
    internal = set(instance["internal"])
    if internal & {o.name for o in model.graph.output}:
        return True
    return any(i in internal and not set(n.output) <= inside for n in model.graph.node for i in n.input)


def _in_trio(instance: dict, model: onnx.ModelProto) -> bool:
    """The instance's MatMul is one of exactly three of its input: the Q/K/V rule takes it."""
    x = instance.get("projects")
    return x is not None and sum(n.op_type == "MatMul" and x == n.input[0] for n in model.graph.node) == 3


@settings(max_examples=30)
@given(graphs(max_steps=6))
def test_planted_patterns_fuse_and_decoys_do_not(model):
    """A planted pattern whose intermediates nobody else reads always fuses (its root's producer
    is replaced); a decoy's marker keeps its op, or is not made by the op it must not become.
    The rules alone: canonicalization would merge two identical planted patterns into one."""
    out, _ = rewrite_with_report(model, canonicalize=False)
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    for p in planted(model):
        event(f"planted {p['kind']}" + (" decoy" if "marker" in p else ""))
        if "marker" in p:
            got = producers.get(p["marker"])
            if p["forbidden"]:
                assert got not in p["forbidden"], f"decoy {p['kind']} fused into {got}"
            else:
                assert got == p["op"], f"decoy {p['kind']}: {p['marker']} is now made by {got}"
        elif not _escapes(p, model) and not _in_trio(p, model):
            got = producers.get(p["root"])
            assert got != p["op"], f"planted {p['kind']} did not fuse"
            if p["fused"]:
                assert got == p["fused"], f"planted {p['kind']} fused into {got}, not {p['fused']}"


def test_regression_masked_scores_stay_out_of_the_stream():
    """An attention decoy whose scores are read elsewhere once put the causal mask's -1e4 into
    the main stream; a later float16 attention multiplied it into ~8e3, where float16 rounding
    alone (a fused projection's other summation order) exceeds the comparison's tolerance."""
    steps = [("layer_norm", 1, 0), ("attention_decoy", 1, 0), ("unary", 0, 0), ("rms_norm", 0, 0),
             ("attention_decoy", 0, 53)]
    model = build_graph(3, 2, steps, [], 36292, np.float16)
    outs = run(model, make_inputs(model))
    assert max(float(np.abs(v).max()) for v in outs.values()) < 100
    assert_equal_outputs(model, rewrite_with_report(model)[0], make_inputs(model))


def test_regression_float16_norm_gain_stays_within_tolerance():
    """float16 norms took eps = 1e-2: an RMSNorm decoy over axis 0 of a one-row graph is
    x/sqrt(x^2 + eps), whose gain 1/sqrt(eps) = 10 near 0 turned the fused LayerNorms' (float32)
    rounding differences upstream into 0.0117 > float16's 0.01 tolerance."""
    steps = [("mm_bias_decoy", 0, 0), ("silu", 1, 0), ("skip_norm", 56, 0), ("qkv", 1, 0),
             ("rms_norm_decoy", 3, 0), ("layer_norm", 30, 0)]
    model = build_graph(1, 1, steps, [], 2171, np.float16)
    assert_equal_outputs(model, rewrite_with_report(model)[0], make_inputs(model))


class RuleOrder(RuleBasedStateMachine):
    """Apply single rules in a random order to a random graph."""

    @initialize(model=graphs(max_steps=8))
    def start(self, model):
        self.original = model
        self.model = model
        self.feeds = make_inputs(model)
        self.applied = []
        self.alone = {}
        self.names = {n.name for n in model.graph.node}
        self.chained = False

    @rule(r=st.sampled_from(RULES))
    def apply(self, r):
        self.model, rep = rewrite_with_report(self.model, [r])
        self.applied.append(r)
        self.chained |= any(not set(f.matched) <= self.names for f in rep.fusions)

    @invariant()
    def valid_and_equal(self):
        if self.applied:
            onnx.checker.check_model(self.model, full_check=True)
            assert_equal_outputs(self.original, self.model, self.feeds)

    @precondition(lambda self: self.applied and not self.chained)
    @invariant()
    def disjoint_rules_commute(self):
        matched = {}
        counts = Counter()
        for r in {r.name: r for r in self.applied}.values():
            if r.name not in self.alone:
                _, rep = rewrite_with_report(self.original, [r])
                self.alone[r.name] = ({n for f in rep.fusions for n in f.matched}, rep)
            nodes, rep = self.alone[r.name]
            matched[r.name] = nodes
            counts += Counter(op for op, k in rep.ops_after.items() if op.startswith("fusegraph.")
                              for _ in range(k))
        names = list(matched)
        if any(matched[a] & matched[b] for i, a in enumerate(names) for b in names[i + 1:]):
            return
        got = Counter(f"fusegraph.{op}" for op, k in fused_counts(self.model).items() for _ in range(k))
        assert got == counts


RuleOrder.TestCase.settings = settings(max_examples=15, stateful_step_count=5)
test_rule_order = RuleOrder.TestCase


NEAR_MISS_DECOYS = ("gelu_near_decoy", "layer_norm_pow_decoy", "rms_norm_pow_decoy", "attention_mask_decoy")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", NEAR_MISS_DECOYS)
def test_near_miss_decoys_keep_their_ops_and_values(kind, dtype):
    """Each variant of a near miss (GELU's 0.5 off by 0.1%, grown by broadcasting, or an
    overridable initializer; Pow(d, 2.002) in a norm; a causal Where with a finite fill;
    probabilities cast through int32), over several seeds: the rewrite is valid, runs on the
    same inputs (an overridable initializer keeps its graph input and its default), is equal,
    and the decoy's marker keeps its op."""
    for seed in range(6):
        model = build_graph(2, 2, [(kind, 0, 1), ("unary", 0, 0)], [], seed, dtype)
        out, _ = rewrite_with_report(model)
        onnx.checker.check_model(out, full_check=True)
        assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
        assert_equal_outputs(model, out, make_inputs(model))
        producers = {o: n.op_type for n in out.graph.node for o in n.output}
        for p in planted(model):
            assert producers.get(p["marker"]) == p["op"], f"seed {seed}: decoy {p['kind']} fused"
