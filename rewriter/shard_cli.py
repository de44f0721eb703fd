"""`rewrite shard` and `rewrite verify-shards`: tensor parallelism from the command line.

    rewrite shard MODEL.onnx --tp N -o DIR [--external-data] [--json]
    rewrite verify-shards ORIGINAL.onnx DIR [--shape NAME:DIMS ..] [--inputs feeds.npz] [--atol A --rtol R] [--json]

`shard` writes DIR/rank0.onnx .. rank{N-1}.onnx (each atomically, weights in rank{r}.onnx.data when
large or asked for) and DIR/shard.json, and prints what it sharded, the collectives per rank, the
weight bytes per rank against 1/N of the sharded weights plus the replicated ones, and every
projection left whole with the reason. `verify-shards` runs the rank models in lock step on the
CPU (`fusegraph.verify.lockstep`) and compares each rank's outputs with the original's: exit 0 equal,
1 a mismatch, 2 bad input, as `rewrite verify`.
"""

from __future__ import annotations

import json

from .errors import ArgumentParser, InputError


def main(command: str, argv: list[str]) -> int:
    return shard_main(argv) if command == "shard" else verify_main(argv)


def shard_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="rewrite shard", description="Split a model into tensor-parallel rank models.")
    p.add_argument("model")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size (number of ranks)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="existing folder for rank0.onnx ...")
    p.add_argument("--external-data", action="store_true", help="weights in rank{r}.onnx.data even when small")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.tp < 1:
        raise InputError(f"--tp {args.tp}: the tensor-parallel size must be at least 1")
    from .sharding import shard_file, summary_lines
    report = shard_file(args.model, args.output, args.tp, external=True if args.external_data else None)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(summary_lines(report)))
    return 0


def verify_main(argv: list[str]) -> int:
    from .verify import add_comparison_options, diff_lines

    p = ArgumentParser(prog="rewrite verify-shards",
                       description="Run tensor-parallel rank models in lock step on the CPU and compare with the original.")
    p.add_argument("original")
    p.add_argument("folder", metavar="DIR")
    add_comparison_options(p)
    args = p.parse_args(argv)
    from .verify.lockstep import rank_files, verify_shards
    from .model_io import load_model
    from .verify import parse_shapes
    load_model(args.original)  # a missing or broken file is one error line
    paths = rank_files(args.folder)
    ranks = [_with_weights(load_model(path), path) for path in paths]
    feeds = _load_feeds(args.inputs) if args.inputs else None
    dims: dict[str, int] = {}
    diffs = verify_shards(args.original, ranks, parse_shapes(args.shape), feeds=feeds, atol=args.atol,
                          rtol=args.rtol, seed=args.seed, dims_used=dims)
    if args.json:
        print(json.dumps({"ranks": len(ranks), "dims": dims, "outputs": [d.__dict__ for d in diffs]}, indent=2))
    else:
        print(f"ranks: {len(ranks)} (lock step, collectives in numpy)")
        print("\n".join(diff_lines(diffs, dims)))
    return 0 if all(d.ok for d in diffs) else 1


def _load_feeds(path: str) -> dict:
    """The arrays of an .npz file (as `rewrite verify --inputs` reads them)."""
    import numpy as np
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: not an .npz archive of named arrays (np.savez writes one)")
        with data:
            return {k: data[k] for k in data.files}
    except InputError:
        raise
    except Exception as e:  # zipfile, zlib, pickle and numpy each raise their own on a bad file
        raise InputError(f"{path}: cannot read inputs ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def _with_weights(model, path: str):
    """A rank model with its external data read in (checked by load_model: inside its folder)."""
    import os

    from onnx.external_data_helper import load_external_data_for_model
    load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    return model
