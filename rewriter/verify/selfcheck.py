"""Rule self-verification: build graphs from a rule's own pattern, rewrite them, compare.

`verify_rule(rule)` needs nothing but the rule. For every branch path of its pattern (each
option of every `Alt`/`optional()` and both operand orders of every commutative op, see
`fusegraph.verify.instantiate`) it searches for a concrete instance the rule fires on (captures as
inputs or constants of various ranks, or the concrete captures of `Rule.examples`), then
checks each instance:

1. the rule fires (a branch no instance fires on is dead code or a matcher bug);
2. the rewritten model passes `onnx.checker.check_model(full_check=True)` and strict shape
   inference;
3. ONNX Runtime gives the same outputs as for the original, within `verify.TOLERANCES` for the
   output dtype, or bit for bit when the graph is linear (`fusegraph.verify.exact`);
4. so does `onnx.reference.ReferenceEvaluator` (when it can run the original at all).

Then hypothesis varies the instances (dim size, float dtype, opset, constants as initializers
or Constant nodes, constant and attribute values, input values) under the active settings
profile and shrinks any failure to the smallest graph and simplest draw. Every failure is
saved as a repro directory (original.onnx, rewritten.onnx, inputs.npz, README.txt with the
seed and the instance), whose path the error message gives.

The rule runs alone, without `fusegraph.canonicalize` (which has its own tests): every branch is
checked as written, including those canonicalization would respell first (a no-op Cast, a scale
of 1), for callers that turn it off.

Inputs are floats in [-1, 1) and small non-negative ints; an instance whose *original* output
is not finite, or that ONNX Runtime refuses to run, is not the rule's fault and is discarded.

Last, the near misses (`fusegraph.verify.mutate`): every covered instance is mutated one edit at a time
(constants by an ulp, 0.1%, 1%, sign and broadcast-growing shapes, mask fills, initializers that
are also graph inputs, attributes set or left at their default, Cast targets, input dims, the
float type and the opset 13..23) and each mutant must be refused by the rule or rewritten into
a valid model (full checker, ONNX Runtime loads it) equal to it on adversarial inputs (large
magnitudes, zeros, zero-variance rows, masked and fully masked rows), in ONNX Runtime and, for
16-bit floats whose rounding ONNX Runtime's CPU kernels hide, in `onnx.reference`. A mutant
whose original is invalid or that ONNX Runtime refuses is discarded; NaN where the other model
is finite is a failure (only an overflow on large inputs is excused). Each failing kind of
mutant is reported once, on the smallest instance, with a saved repro.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from fusegraph.api import rewrite_with_report
from fusegraph.rule import Rule

from .differential import DEFAULT_DIM, TOLERANCES, OutputDiff, compare, make_inputs, run
from .exact import compare_exact, exact_inputs, is_exact
from .instantiate import (FLOAT_DTYPES, Instance, Picker, Uninstantiable, branch_paths, build,
                          describe_path, fitted_leaves, leaf_assignments, mentioned_numbers)
from .mutate import LARGE_FEEDS, Mutant, adversarial_feeds, mutants, retype

#: Opsets instances are built at: the first that the pattern's ops exist in is used first.
OPSETS = (18, 23, 17, 21)
#: Dim sizes hypothesis draws from (the first is the one the search uses).
SIZES = (3, 2, 4, 5)
#: How many leaf assignments the search tries per branch path before giving up.
SEARCH_LIMIT = 240
#: Up to how many dead paths are tried in pairs (`_cover_jointly`).
PAIR_LIMIT = 8
#: Opsets every instance is rebuilt at as a mutant (the float types too: `FLOAT_DTYPES`).
MUTANT_OPSETS = tuple(range(13, 24))
#: The kind of "mutant" that is the instance itself, on the adversarial inputs.
ADVERSARIAL = "adversarial inputs"


class RuleCheckFailure(AssertionError):
    """A rule broke a property on some instance; the message names the saved repro."""


class Rejected(Exception):
    """The instance is unusable (invalid original, ORT refuses it, non-finite outputs)."""


@dataclass
class Found:
    """A branch path and an instance of it that the rule fires on."""

    path: dict[int, int]
    inst: Instance
    nodes: int
    label: list[int]


@dataclass
class RuleCheck:
    """What `verify_rule` covered."""

    rule: str
    paths: int = 0
    covered: list[Found] = field(default_factory=list)
    instances: int = 0
    exact_instances: int = 0
    #: Near-miss mutants checked, and what became of them.
    mutants: int = 0
    refused: int = 0
    rewritten_equal: int = 0
    discarded: int = 0
    #: One line per failing kind of mutant (with its repro), empty when the rule survived all.
    failures: list[str] = field(default_factory=list)


def default_repro_dir() -> str:
    return os.environ.get("FUSEGRAPH_REPRO_DIR") or os.path.join(tempfile.gettempdir(), "fusegraph-repro")


def verify_rule(rule: Rule, *, repro_dir: str | None = None, max_examples: int | None = None,
                seed: int | None = None, path_limit: int = 256, max_mutants: int | None = None,
                own_instances: bool = True) -> RuleCheck:
    """Check `rule` on graphs built from its pattern and on their near misses; raise
    RuleCheckFailure on any violation (its `.check` holds the counts).

    `max_examples` (default: the active hypothesis profile's) bounds the random phase; `seed`
    fixes hypothesis' randomness (to replay a reported failure). `max_mutants` bounds the
    mutation phase (default: every mutant of every covered instance; 0 skips it);
    `own_instances=False` skips the checks on the pattern's own instances (the mutation phase
    still needs them found).
    """
    repro_dir = repro_dir or default_repro_dir()
    result = RuleCheck(rule.name)
    paths = branch_paths(rule.outputs, path_limit)
    result.paths = len(paths)
    dead: list[dict[int, int]] = []
    previous: list[Instance] = []
    reasons: dict[int, str] = {}
    for i, path in enumerate(paths):
        if i >= 8 and not result.covered:  # the search can't instantiate the rule at all
            dead.extend(paths[i:])
            break
        found = _search(rule, path, previous, SEARCH_LIMIT if not result.covered else SEARCH_LIMIT // 4)
        if isinstance(found, str):
            dead.append(path)
            reasons[id(path)] = found
            continue
        previous.insert(0, found.inst)
        del previous[4:]
        result.covered.append(found)
    # Paths searched before any instance was known get the instances found since.
    retry, dead = dead, []
    for path in retry:
        found = _search(rule, path, [f.inst for f in result.covered[:8]], 0) if result.covered else "not searched"
        if isinstance(found, str):
            dead.append(path)
        else:
            result.covered.append(found)
    dead = _cover_jointly(rule, dead, [f.inst for f in result.covered[:8]], result)
    dead = [f"  branch {describe_path(rule.outputs, p)}: {reasons.get(id(p), 'not searched')}" for p in dead]
    if dead:
        raise RuleCheckFailure(
            f"rule {rule.name!r}: {len(dead)} of {len(paths)} branch paths never fire "
            f"(a dead alternative, or the rule needs Rule.examples):\n" + "\n".join(dead))
    by_size = sorted(result.covered, key=lambda f: (f.nodes, f.label))
    if own_instances:
        for f in result.covered:
            _check_counted(rule, f.path, f.inst, repro_dir, result)
        _random_phase(rule, by_size, repro_dir, max_examples, seed, result)
        if not result.instances:
            raise RuleCheckFailure(f"rule {rule.name!r}: no instance it fires on could be checked (every one "
                                   "has an original that ONNX Runtime refuses or whose outputs are not finite); "
                                   "give valid captures in Rule.examples")
    _mutation_phase(rule, by_size, repro_dir, 1 << 30 if max_mutants is None else max_mutants, result)
    if result.failures:
        failure = RuleCheckFailure(f"rule {rule.name!r}: {len(result.failures)} kinds of near-miss mutant "
                                   f"break it:\n" + "\n".join(result.failures))
        failure.check = result
        raise failure
    return result


def _cover_jointly(rule: Rule, dead: list[dict[int, int]], previous: list[Instance],
                   result: RuleCheck) -> list[dict[int, int]]:
    """The dead paths whose choices fire on no path that also takes another dead path's.

    Each path deviates from another in one choice; some choices only make valid ONNX together
    (ReduceMean's axes as input in both of a norm's means: a model has one opset). A dead path
    is covered by a firing path that takes its choices and another dead path's non-first ones.
    Tried only when few paths are dead (pairs grow quadratically) and with the instances found.
    """
    if not previous or len(dead) > PAIR_LIMIT:
        return dead
    left = []
    for path in dead:
        for other in dead:
            merged = {**path, **{k: c for k, c in other.items() if c and not path.get(k)}}
            if other is path or merged == path:
                continue
            found = _search(rule, merged, previous, 0)
            if not isinstance(found, str):
                result.covered.append(found)
                break
        else:
            left.append(path)
    return left


def _search(rule: Rule, path: dict[int, int], previous: list[Instance], limit: int) -> Found | str:
    """The first instance of `path` the rule fires on, or why none.

    Tries the instances that fired on earlier paths, then leaf realisations simplest first,
    each with the first, the second and random value choices. An instance whose original
    ONNX Runtime can't run to finite outputs (a GlobalAveragePool of rank 2 passes shape
    inference) is taken only if no other fires."""
    reason = "no instance was valid ONNX"
    unrunnable: Found | None = None
    rng = np.random.default_rng(0)
    for tries, inst in enumerate(_candidates(rule, path, previous, limit)):
        picker = Picker(inst.picks, (None, lambda n: 1, lambda n: int(rng.integers(n)))[tries % 3])
        try:
            built = build(rule.outputs, path, inst, picker)
            model = prepare(built.model)
        except Uninstantiable as e:
            return str(e)
        except Rejected as e:
            reason = f"no valid instance ({e})"
            continue
        try:
            _, report = rewrite_with_report(model, [rule], canonicalize=False, explain=rule.name)
        except Exception as e:
            raise RuleCheckFailure(f"rule {rule.name!r}, branch {describe_path(rule.outputs, path)}: "
                                   f"rewriting raised {type(e).__name__}: {_first_line(e)}\n"
                                   f"  instance: {_describe(inst)}") from e
        if report.per_rule[rule.name]:
            found = Found(path, replace(inst, picks=tuple(picker.taken)), built.nodes,
                          describe_path(rule.outputs, path))
            if _runs(model):
                return found
            unrunnable = unrunnable or found
            continue
        refusals = sorted(report.near_misses, key=lambda m: -m.depth)
        reason = "the rule fired on none of the instances tried" + (
            f" (the last refused {refusals[0].reason})" if refusals else "")
    return unrunnable or reason


def _runs(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime runs the original to finite outputs (at symbolic dims 2, or 1)."""
    for default_dim in (DEFAULT_DIM, 1):
        try:
            outputs = run(model, make_inputs(model, default_dim=default_dim))
        except Exception:  # no kernel, or a shape only defined at the other size
            continue
        return all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f")
    return False


def _candidates(rule: Rule, path: dict[int, int], previous: list[Instance], limit: int):
    for inst in previous:
        for opset in _opsets_from(inst.opset):
            yield replace(inst, opset=opset)
    examples = list(rule.examples)
    hints = mentioned_numbers(rule.conditions)
    per = max(1, limit // (len(OPSETS) * max(1, len(examples))) // 3)
    for opset in OPSETS:
        for ex in examples or [{}]:
            try:
                probe = build(rule.outputs, path, Instance(opset=opset, example=ex, hints=hints))
            except Uninstantiable:
                return
            for leaves in leaf_assignments([v for v in probe.var_names if v not in ex], per):
                inst = Instance(opset=opset, leaves=leaves, example=ex, hints=hints)
                yield from (inst, inst, inst)  # first, second and random value choices
    if limit:  # none of those: realisations fitted to each operator's schema
        for opset in OPSETS:
            for ex in examples or [{}]:
                for leaves in fitted_leaves(rule.outputs, path, Instance(opset=opset, example=ex, hints=hints), per):
                    inst = Instance(opset=opset, leaves=leaves, example=ex, hints=hints)
                    yield from (inst, inst, inst)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Infer types (as exporters record them) and insist the original is valid ONNX."""
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # checker, inference and protobuf errors alike: not valid ONNX
        raise Rejected(_first_line(e)) from None
    outputs = {o.name for o in model.graph.output}
    keep = [vi for vi in model.graph.value_info if vi.name not in outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return model


def _check_counted(rule: Rule, path: dict[int, int], inst: Instance, repro_dir: str,
                   result: RuleCheck) -> None:
    try:
        exact = check_instance(rule, path, inst, repro_dir)
    except Rejected:
        return
    result.instances += 1
    result.exact_instances += exact


def check_instance(rule: Rule, path: dict[int, int], inst: Instance, repro_dir: str,
                   picker: Picker | None = None) -> bool:
    """Build, rewrite and compare one instance; raises RuleCheckFailure (with a saved repro)
    on a violation and Rejected for an unusable instance. Returns whether it ran exact."""
    fresh = _replayable(picker)
    built = build(rule.outputs, path, replace(inst, integer=True), fresh())
    if not is_exact(built.model):
        built = build(rule.outputs, path, inst, fresh())
    original = prepare(built.model)
    exact = is_exact(original)
    make = exact_inputs if exact else make_inputs
    feeds = make(original, seed=inst.seed)
    try:
        expected = run(original, feeds)
    except Exception as e:
        # Symbolic dims take 2; some originals are only defined at 1 (a batch-1 cache the
        # export broadcasts over a dynamic batch): compare where the original is defined.
        feeds = make(original, seed=inst.seed, default_dim=1)
        try:
            expected = run(original, feeds)
        except Exception:  # ORT lacks a kernel for this op/dtype: not the rule's business
            raise Rejected(f"ONNX Runtime cannot run the original: {_first_line(e)}") from None
    if not all(np.all(np.isfinite(v)) for v in expected.values() if v.dtype.kind == "f"):
        raise Rejected("the original's outputs are not finite")

    def fail(what: str, rewritten: onnx.ModelProto | None, diffs: list[OutputDiff] | None = None) -> None:
        where = save_repro(repro_dir, rule, path, inst, original, rewritten, feeds, what, diffs)
        raise RuleCheckFailure(f"rule {rule.name!r}, branch {describe_path(rule.outputs, path)}: {what}\n"
                               f"  instance: {_describe(inst)}\n  repro: {where}")

    try:
        rewritten, report = rewrite_with_report(original, [rule], canonicalize=False)
    except Exception as e:
        fail(f"rewriting raised {type(e).__name__}: {_first_line(e)}", None)
    if not report.per_rule[rule.name]:
        raise Rejected("the rule does not fire on this variation")
    try:
        onnx.checker.check_model(rewritten, full_check=True)
        onnx.shape_inference.infer_shapes(rewritten, check_type=True, strict_mode=True)
    except Exception as e:
        fail(f"the rewritten model is invalid: {_first_line(e)}", rewritten)
    try:
        got = run(rewritten, feeds)
    except Exception as e:
        fail(f"ONNX Runtime cannot run the rewritten model: {_first_line(e)}", rewritten)
    exact = exact and is_exact(rewritten)
    diffs = compare_exact(expected, got) if exact else compare(expected, got)
    if not all(d.ok for d in diffs):
        fail(f"ONNX Runtime outputs differ{' (exact mode)' if exact else ''}: "
             + "; ".join(f"{d.name} max abs {d.max_abs:.3g}" for d in diffs if not d.ok), rewritten, diffs)
    ref_expected = _reference(original, feeds)
    if ref_expected is not None:
        ref_got = _reference(rewritten, feeds)
        if ref_got is None:
            fail("onnx.reference cannot run the rewritten model (it runs the original)", rewritten)
        diffs = compare(ref_expected, ref_got)
        if not all(d.ok for d in diffs):
            fail("onnx.reference outputs differ: "
                 + "; ".join(f"{d.name} max abs {d.max_abs:.3g}" for d in diffs if not d.ok), rewritten, diffs)
    return exact


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator
    try:
        sess = ReferenceEvaluator(model)
        outs = sess.run(None, feeds)
    except Exception:  # the reference lacks an op or a dtype
        return None
    return {o.name: np.asarray(v) for o, v in zip(model.graph.output, outs)}


def _random_phase(rule: Rule, found: list[Found], repro_dir: str, max_examples: int | None,
                  seed: int | None, result: RuleCheck) -> None:
    """Vary the covered instances with hypothesis; shrinking favours small graphs."""
    from hypothesis import HealthCheck, assume, given, settings, strategies as st
    from hypothesis.errors import Unsatisfiable
    from hypothesis import seed as fix_seed

    if not found:
        return
    opts = {} if max_examples is None else {"max_examples": max_examples}

    @settings(deadline=None, suppress_health_check=list(HealthCheck), **opts)
    @given(st.data())
    def vary(data):
        f = found[data.draw(st.integers(0, len(found) - 1), label="instance")]
        inst = replace(
            f.inst,
            n=data.draw(st.sampled_from(SIZES), label="n"),
            float_dtype=data.draw(st.sampled_from(FLOAT_DTYPES), label="float dtype"),
            opset=data.draw(st.sampled_from(_opsets_from(f.inst.opset)), label="opset"),
            const_as_node=data.draw(st.booleans(), label="constants as Constant nodes"),
            seed=data.draw(st.integers(0, 2**16), label="value seed"))

        def offset(n: int) -> int:
            return data.draw(st.integers(0, n - 1))
        try:
            exact = check_instance(rule, f.path, inst, repro_dir, Picker(inst.picks, offset))
        except (Rejected, Uninstantiable):
            assume(False)
        result.instances += 1
        result.exact_instances += exact

    test = vary if seed is None else fix_seed(seed)(vary)
    try:
        test()
    except Unsatisfiable:  # no variation runs: verify_rule reports it if no instance did
        pass


def _mutation_phase(rule: Rule, found: list[Found], repro_dir: str, limit: int, result: RuleCheck) -> None:
    """Check up to `limit` near misses of the covered instances, spread so that a small budget
    still tries every kind on several instances: kinds take turns, and each kind's turn goes
    to the next instance (smallest first). A kind that failed once is not tried again."""
    if limit <= 0:
        return
    per_kind: dict[str, list[list[tuple[int, Mutant]]]] = {}
    instances: list[tuple[Found, Instance, onnx.ModelProto]] = []
    for f in found:
        inst = replace(f.inst, const_as_node=False, integer=False)
        try:
            original = prepare(build(rule.outputs, f.path, inst).model)
        except (Rejected, Uninstantiable):
            continue
        by_kind: dict[str, list[tuple[int, Mutant]]] = {}
        for m in [*mutants(original, inst.seed), *_rebuilt(rule, f, inst)]:
            by_kind.setdefault(m.kind, []).append((len(instances), m))
        instances.append((f, inst, original))
        for kind, ms in by_kind.items():
            per_kind.setdefault(kind, []).append(ms)
    turns = [[m for batch in itertools.zip_longest(*lists) for m in batch if m] for lists in per_kind.values()]
    order = [m for batch in itertools.zip_longest(*turns) for m in batch if m]
    #: Per instance, the input sets on which the instance itself fails: a mutant's failure
    #: there would be the instance's, reported once under ADVERSARIAL.
    known: dict[int, set[str]] = {}
    failed: set[str] = set()
    for i, m in order:
        if result.mutants >= limit:
            break
        if m.kind in failed:
            continue
        f, inst, original = instances[i]
        if i not in known:
            known[i] = _failing_inputs(rule, f, inst, original, repro_dir, result, failed)
        result.mutants += 1
        try:
            outcome = check_mutant(rule, f.path, inst, m, repro_dir, skip=known[i])
        except RuleCheckFailure as e:
            failed.add(m.kind)
            result.failures.append(f"  {e}".replace("\n", "\n    "))
            continue
        if outcome == "refused":
            result.refused += 1
        elif outcome == "equal":
            result.rewritten_equal += 1
        else:
            result.discarded += 1


def _failing_inputs(rule: Rule, f: Found, inst: Instance, original: onnx.ModelProto, repro_dir: str,
                    result: RuleCheck, failed: set[str]) -> set[str]:
    """The adversarial input sets the (unmutated) instance fails on; the first failure of any
    instance is reported."""
    itself = Mutant(ADVERSARIAL, "the instance itself", original)
    labels: set[str] = set()
    while True:
        try:
            check_mutant(rule, f.path, inst, itself, repro_dir, skip=labels)
            return labels
        except RuleCheckFailure as e:
            if e.inputs in labels:  # not an input set's failure
                return labels
            labels.add(e.inputs)
            if ADVERSARIAL not in failed:
                failed.add(ADVERSARIAL)
                result.failures.append(f"  {e}".replace("\n", "\n    "))


def _rebuilt(rule: Rule, f: Found, inst: Instance) -> list[Mutant]:
    """The instance rebuilt at every other opset and float type (fused ops' bodies and the
    rule's opset-dependent targets change with them)."""
    variants = [("opset", f"{inst.opset} -> {o}", replace(inst, opset=o)) for o in MUTANT_OPSETS if o != inst.opset]
    variants += [("dtype", f"{np.dtype(inst.float_dtype).name} -> {np.dtype(d).name}", replace(inst, float_dtype=d))
                 for d in FLOAT_DTYPES if d != inst.float_dtype]
    out = []
    for kind, detail, variant in variants:
        try:
            out.append(Mutant(kind, detail, build(rule.outputs, f.path, variant).model))
        except Uninstantiable:
            continue
    return out


def check_mutant(rule: Rule, path: dict[int, int], inst: Instance, mutant: Mutant, repro_dir: str,
                 skip: set[str] | frozenset[str] = frozenset()) -> str:
    """"invalid" (the mutant's original is not valid ONNX or doesn't load in ONNX Runtime),
    "refused", "equal" (rewritten, valid and equal on every adversarial input set the original
    runs on, but those labelled in `skip`) or "unusable" (the original runs on none); raises
    RuleCheckFailure (`.inputs`: the input set's label) otherwise."""
    try:
        original = prepare(mutant.model)
        run_original = _session(original)
    except Exception:  # Rejected, or ONNX Runtime refuses to load the original
        return "invalid"
    feed_sets = [(label, feeds) for label, feeds in adversarial_feeds(original, inst.seed, mutant.overrides)
                 if label not in skip]
    label, feeds = feed_sets[0] if feed_sets else ("normal", {})

    def fail(what: str, rewritten: onnx.ModelProto | None, diffs: list[OutputDiff] | None = None) -> None:
        where = save_repro(repro_dir, rule, path, inst, original, rewritten, feeds, what, diffs, mutant=str(mutant))
        failure = RuleCheckFailure(f"rule {rule.name!r}, mutant {mutant}, branch {describe_path(rule.outputs, path)}: "
                                   f"{what}\n  instance: {_describe(inst)}\n  repro: {where}")
        failure.inputs = label
        raise failure

    try:
        rewritten, report = rewrite_with_report(original, [rule])
    except Exception as e:
        fail(f"rewriting raised {type(e).__name__}: {_first_line(e)}", None)
    if not report.per_rule[rule.name]:
        return "refused"
    try:
        onnx.checker.check_model(rewritten, full_check=True)
        onnx.shape_inference.infer_shapes(rewritten, check_type=True, strict_mode=True)
        run_rewritten = _session(rewritten)
    except Exception as e:
        fail(f"the rewritten model is invalid or ONNX Runtime refuses it: {_first_line(e)}", rewritten)
    ran = 0
    for label, feeds in feed_sets:
        try:
            expected = run_original(feeds)
        except Exception:  # these inputs are outside the original's domain
            continue
        large = label in LARGE_FEEDS
        if large and not all(np.all(np.isfinite(v)) for v in expected.values() if v.dtype.kind == "f"):
            continue  # the original overflows: no reference to compare against
        ran += 1
        try:
            got = run_rewritten(feeds)
        except Exception as e:
            fail(f"ONNX Runtime cannot run the rewritten model on inputs '{label}': {_first_line(e)}", rewritten)
        diffs = compare(expected, got)
        if large and not all(d.ok for d in diffs):
            conditioning = _rounding_error(original, feeds, expected)
            if conditioning is None:
                continue
            diffs = _compare_large(expected, got, conditioning)
        if not all(d.ok for d in diffs):
            fail(f"ONNX Runtime outputs differ on inputs '{label}': " + _show_diffs(diffs), rewritten, diffs)
        if label == "normal" and _is_16_bit(original):
            ref_expected = _reference(original, feeds)
            if ref_expected is not None and not all(d.ok for d in compare(ref_expected, expected)):
                continue  # the original overflows or rounds apart in strict 16-bit: no reference
            ref_got = _reference(rewritten, feeds) if ref_expected is not None else None
            if ref_got is not None:
                diffs = compare(ref_expected, ref_got)
                if not all(d.ok for d in diffs):
                    fail("onnx.reference outputs differ on inputs 'normal': " + _show_diffs(diffs), rewritten, diffs)
    return "equal" if ran else "unusable"


def _rounding_error(original: onnx.ModelProto, feeds: dict[str, np.ndarray],
                    expected: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """How far the original's own outputs are from what it computes in float64 on `feeds`
    (None if it can't be run so): on large inputs a softmax over scores of 1e8 amplifies
    rounding far beyond any fixed tolerance, and a rewrite may round differently."""
    kinds = {vi.type.tensor_type.elem_type for vi in original.graph.input}
    source = next((k for k in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) if k in kinds), None)
    if source is None:
        return {name: np.zeros(v.shape) for name, v in expected.items()}
    wide = retype(original, source, onnx.TensorProto.DOUBLE)
    np_source = onnx.helper.tensor_dtype_to_np_dtype(source)
    try:
        precise = run(wide, {k: v.astype(np.float64) if v.dtype == np_source else v for k, v in feeds.items()})
    except Exception:  # the float64 twin is not valid (an op without a double kernel)
        return None
    with np.errstate(invalid="ignore"):
        return {name: np.nan_to_num(np.abs(expected[name].astype(np.float64) - precise[name].astype(np.float64)),
                                    nan=0.0, posinf=0.0) if name in precise else np.zeros(v.shape)
                for name, v in expected.items()}


def _compare_large(expected: dict[str, np.ndarray], got: dict[str, np.ndarray],
                   conditioning: dict[str, np.ndarray]) -> list[OutputDiff]:
    """`verify.compare` for large inputs: the absolute tolerance scales with the outputs'
    magnitude, and each element may also differ by twice the original's own rounding error
    there (`conditioning`, from `_rounding_error`)."""
    diffs = []
    for name, ref in expected.items():
        atol, _ = TOLERANCES.get(ref.dtype, (0.0, 0.0))
        finite = np.abs(ref[np.isfinite(ref)].astype(np.float64)) if ref.dtype.kind == "f" else np.zeros(0)
        slack = atol * max(1.0, float(finite.max(initial=0.0))) + 2 * conditioning[name]
        diffs += compare({name: ref}, {name: got[name]} if name in got else {}, atol=slack)
    return diffs


def _session(model: onnx.ModelProto) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """`verify.run`, with the session made once for the many input sets of a mutant."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return lambda feeds: dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _is_16_bit(model: onnx.ModelProto) -> bool:
    kinds = {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]}
    return bool(kinds & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def _show_diffs(diffs: list[OutputDiff]) -> str:
    return "; ".join(f"{d.name} max abs {d.max_abs:.3g}" for d in diffs if not d.ok)


def _replayable(picker: Picker | None) -> Callable[[], Picker | None]:
    """Fresh pickers that all make the same choices (an instance may be built twice), drawing
    each offset from `picker` once."""
    if picker is None or picker.offset is None:
        return lambda: picker and Picker(picker.base)
    drawn: list[int] = []
    source = picker.offset

    def make() -> Picker:
        count = iter(range(1 << 30))

        def offset(n: int) -> int:
            k = next(count)
            if k == len(drawn):
                drawn.append(source(n))
            return drawn[k]
        return Picker(picker.base, offset)
    return make


def _opsets_from(first: int) -> list[int]:
    return [first] + [o for o in OPSETS if o != first]


def save_repro(repro_dir: str, rule: Rule, path: dict[int, int], inst: Instance,
               original: onnx.ModelProto, rewritten: onnx.ModelProto | None,
               feeds: dict[str, np.ndarray], what: str, diffs: list[OutputDiff] | None,
               mutant: str | None = None) -> str:
    """Write the failing instance (or near miss of it) where a person can replay it with
    `rewrite verify`."""
    digest = hashlib.sha1(original.SerializeToString()).hexdigest()[:10]
    where = os.path.join(repro_dir, f"{rule.name}-{digest}")
    os.makedirs(where, exist_ok=True)
    onnx.save(original, os.path.join(where, "original.onnx"))
    if rewritten is not None:
        onnx.save(rewritten, os.path.join(where, "rewritten.onnx"))
    np.savez(os.path.join(where, "inputs.npz"), **feeds)
    with open(os.path.join(where, "README.txt"), "w") as f:
        f.write(f"rule: {rule.name}\nfailure: {what}\nbranch path: {describe_path(rule.outputs, path)}\n"
                f"instance: {_describe(inst)}\n" + (f"mutant: {mutant}\n" if mutant else ""))
        for d in diffs or ():
            f.write(f"output {d.name}: max abs {d.max_abs:.6g}, max rel {d.max_rel:.6g}\n")
        f.write(f"replay: rewrite verify {where}/original.onnx {where}/rewritten.onnx "
                f"--inputs {where}/inputs.npz\n")
    return where


def _describe(inst: Instance) -> str:
    leaves = ", ".join(f"{k}={'const' if v.const else 'input'} rank {v.rank} {v.kind}"
                       f"{' ones ' + str(list(v.ones)) if v.ones else ''}" for k, v in inst.leaves.items())
    return (f"n={inst.n} dtype={np.dtype(inst.float_dtype).name} opset={inst.opset} "
            f"const_as_node={inst.const_as_node} seed={inst.seed} leaves[{leaves}]"
            + (f" example keys={sorted(inst.example)}" if inst.example else ""))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
