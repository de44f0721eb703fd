"""Refresh tests/data/known_misses.json after the rules changed: rewrite every corpus file and
compare its fused counts with the table.

Why: the table is a floor the real-model tests hold (tests/corpus.py). When a rule starts fusing
a listed form, the tests fail and ask for its entry to go; this script does that, raises floors
that grew, and prints what it did. It never lowers a floor and never invents a reason: a drop or
a new shortfall is printed and left for a person (the tests keep failing until the rule is fixed
or the entry is written by hand, with its reason). Residue entries are refreshed the same way.

    python tests/data/refresh_known_misses.py          # report only
    python tests/data/refresh_known_misses.py --write  # also rewrite the table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import DATA, FUSED_OPS, KNOWN_MISSES, MANIFEST, MODELS, NAMES, RESIDUE, fused  # noqa: E402

from fusegraph.api import rewrite_with_report  # noqa: E402
from fusegraph.testing import op_counts  # noqa: E402

RESIDUE_OPS = {"norm": ("ReduceMean", "Sqrt"), "gelu": ("Erf", "Pow")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite known_misses.json with the raised floors")
    args = parser.parse_args(argv)
    misses = json.loads(json.dumps(KNOWN_MISSES))
    residue = json.loads(json.dumps(RESIDUE))
    needs_review = 0
    for name in NAMES:
        out, _ = rewrite_with_report(onnx.load(MODELS / name))
        counts = op_counts(out)
        listed = misses.get(name, {})
        for category in FUSED_OPS:
            expected, got = MANIFEST[name]["expected"][category], fused(counts, category)
            miss = listed.get(category)
            if miss is None:
                if got != expected:
                    needs_review += 1
                    print(f"REVIEW {name}: {got} of {expected} {category} fused and not listed")
            elif got < miss["fused"]:
                needs_review += 1
                print(f"REVIEW {name}: {category} dropped from {miss['fused']} to {got}")
            elif got >= expected:
                print(f"fused now {name}: {category} {got}/{expected}: entry dropped")
                del listed[category]
            elif got > miss["fused"]:
                print(f"grew {name}: {category} {miss['fused']} -> {got} of {expected}")
                miss["fused"] = got
            if category in RESIDUE_OPS and category not in listed:
                for op in RESIDUE_OPS[category]:
                    allowed = residue.get(name, {}).get(op)
                    if counts[op] and (allowed is None or counts[op] > allowed["count"]):
                        needs_review += 1
                        print(f"REVIEW {name}: {counts[op]} {op} left after {category} fusion")
                    elif allowed and counts[op] < allowed["count"]:
                        print(f"residue shrank {name}: {op} {allowed['count']} -> {counts[op]}")
                        if counts[op]:
                            allowed["count"] = counts[op]
                        else:
                            del residue[name][op]
        if name in misses and not misses[name]:
            del misses[name]
        if name in residue and not residue[name]:
            del residue[name]
    if args.write:
        path = DATA / "known_misses.json"
        table = json.loads(path.read_text())
        table.update(misses=misses, residue=residue)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
    print(f"{needs_review} finding(s) need a person")
    return 1 if needs_review else 0


if __name__ == "__main__":
    sys.exit(main())
