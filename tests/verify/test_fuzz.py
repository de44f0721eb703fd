"""Properties of the rewriter on random graphs (fusegraph.fuzz): validity, numerical equality,
idempotence, determinism, and rule-order independence (a stateful test).

Rule-order independence, precisely: (a) applying single rules in any order keeps the model
valid and numerically equal to the original; (b) if the rules applied have pairwise disjoint
match sets on the original (each rule's matched nodes, applying it alone), the fused-op counts
after applying them in any order equal the sum of their counts applied alone. Overlapping rules
(MatMul+Add vs MatMul+Add+Relu) are ordered by priority, so only (a) holds for them.
"""

from collections import Counter

import onnx
from hypothesis import given, note, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fusegraph import rewrite_with_report
from fusegraph.fuzz import graphs
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
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    feeds = make_inputs(model)
    assert_equal_outputs(model, out, feeds)
    again, report2 = rewrite_with_report(out)
    assert not report2.fusions
    assert again.graph.SerializeToString() == out.graph.SerializeToString()
    assert rewrite_with_report(model)[0].SerializeToString() == out.SerializeToString()


@settings(max_examples=30)
@given(graphs(max_steps=6))
def test_planted_patterns_fuse(model):
    """A planted MatMul+bias+Relu whose intermediates nobody else reads always fuses."""
    planted = [n for n in model.graph.node if n.op_type == "Relu"]
    out, report = rewrite_with_report(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    outputs = {o.name for o in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    for relu in planted:
        add = producers.get(relu.input[0])
        if add is None or add.op_type != "Add" or readers[add.output[0]] != 1 or add.output[0] in outputs:
            continue
        mm = producers.get(add.input[0])
        if (mm is None or mm.op_type != "MatMul" or readers[mm.output[0]] != 1 or mm.output[0] in outputs
                or add.input[1] not in inits or mm.input[1] not in inits):
            continue
        assert relu.output[0] not in {o for n in out.graph.node if n.domain == "" and n.op_type == "Relu"
                                      for o in n.output}, "planted MatMul+Add+Relu did not fuse"


class RuleOrder(RuleBasedStateMachine):
    """Apply single rules in a random order to a random graph."""

    @initialize(model=graphs(max_steps=8))
    def start(self, model):
        self.original = model
        self.model = model
        self.feeds = make_inputs(model)
        self.applied = []
        self.alone = {}

    @rule(r=st.sampled_from(RULES))
    def apply(self, r):
        self.model, _ = rewrite_with_report(self.model, [r])
        self.applied.append(r)

    @invariant()
    def valid_and_equal(self):
        if self.applied:
            onnx.checker.check_model(self.model, full_check=True)
            assert_equal_outputs(self.original, self.model, self.feeds)

    @precondition(lambda self: self.applied)
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
