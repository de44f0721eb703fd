"""Near-miss verification of the rule library: what every rule does with its mutants.

Why: a rule's own instances prove that it fires where it should; its near misses (a constant
an ulp or 0.1% off, a finite mask fill, an attribute the pattern does not pin, a narrowing
Cast, a broadcast-growing constant, an initializer that is also a graph input, another opset
or dtype; `fusegraph.verify.mutate`) prove that it refuses what it must, or that what it makes of them
is still right. For every library rule this runs `verify_rule`'s mutation phase and prints,
per rule, the instances found (one per branch path), the mutants checked, how many the rule
refused, how many it rewrote into a valid model equal to the original on every adversarial
input, how many were discarded (an invalid original, or one ONNX Runtime refuses), and the
kinds of mutant that broke it, each with its repro directory.

    python benchmarks/bench_mutants.py [--rules 'norms.*'] [--max-mutants N] [--repro-dir DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from fusegraph.patterns import all_rules
from fusegraph.verify.selfcheck import RuleCheckFailure, default_repro_dir, verify_rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", default="*", help="comma-separated names or prefixes* (default: all)")
    parser.add_argument("--max-mutants", type=int, default=None, help="per rule (default: every mutant)")
    parser.add_argument("--repro-dir", default=default_repro_dir())
    args = parser.parse_args(argv)
    rules = all_rules().select(args.rules.split(",")) if args.rules != "*" else all_rules()

    print("| rule | instances | mutants | refused | rewritten and equal | discarded | failing kinds | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = [0] * 6
    broken: list[tuple[str, str]] = []
    for rule in rules:
        start = time.perf_counter()
        try:
            check = verify_rule(rule, repro_dir=args.repro_dir, max_examples=1, own_instances=False,
                                max_mutants=args.max_mutants)
        except RuleCheckFailure as failure:
            check = getattr(failure, "check", None)
            if check is None:  # the rule's own instances could not be found: no mutants
                print(f"| {rule.name} | - | - | - | - | - | {str(failure).splitlines()[0]} | |")
                continue
        row = [len(check.covered), check.mutants, check.refused, check.rewritten_equal, check.discarded,
               len(check.failures)]
        totals = [t + r for t, r in zip(totals, row)]
        print(f"| {rule.name} | " + " | ".join(map(str, row)) + f" | {time.perf_counter() - start:.1f} |")
        broken += [(rule.name, line) for line in check.failures]
        sys.stdout.flush()
    print("| **total** | " + " | ".join(f"**{t}**" for t in totals) + " | |")
    if broken:
        print("\nFailing (rule, mutant kind): what broke, and the repro directory")
        for name, text in broken:
            first = text.strip().splitlines()[0]
            kind = re.search(r"mutant (.*?) \(", first)
            repro = re.search(r"repro: (\S+)", text)
            what = re.search(r"branch \[[^\]]*\]: (.*)", first)
            what = what.group(1) if what else first
            print(f"- {name} | {kind.group(1) if kind else '?'} | {what[:160]} | {repro.group(1) if repro else '-'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
