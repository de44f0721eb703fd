"""The one error type the command line turns into a single line and exit code 2.

Anything wrong with what the user handed us (a file, a model, a pattern, a flag) raises
`InputError`; everything else is a bug and keeps its traceback.
"""

import argparse


class InputError(Exception):
    """Bad input: the CLI prints `rewrite: error: <message>` and exits with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is an InputError (one line, exit 2) like any other bad input."""

    def error(self, message: str):
        raise InputError(message)


def tolerance(text: str) -> float:
    """An --atol/--rtol value: a finite number >= 0 (a NaN tolerance passes only exact equality
    and a negative one nothing, silently: both are typos, not tolerances)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid tolerance {text!r}: expected a number >= 0") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid tolerance {text!r}: expected a finite number >= 0")
    return value
