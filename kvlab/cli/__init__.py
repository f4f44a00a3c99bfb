"""The ``kvlab`` command line: one module per verb, each with ``NAME``, ``HELP``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args) -> int``; a new verb is one module plus one entry in ``VERBS``.

Every verb prints a readable table by default; with ``--json`` standard output holds only one JSON object
(tables, notices and progress bars go to standard error). Errors from the library (ValueError) print
``kvlab: error: <message>`` and exit with 2.
"""

from __future__ import annotations

import argparse
import sys

from kvlab.cli import ablate, bench, calc, chat, compare, evaluate, fit, generate, inspect, presets, train

VERBS = [calc, compare, inspect, fit, generate, chat, evaluate, bench, train, ablate, presets]

RAW = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb in ``VERBS``; each verb's ``--help`` ends with its example."""
    p = argparse.ArgumentParser(prog="kvlab", formatter_class=RAW,
                                description="KV-cache calculator, inspector, generator and benchmark.",
                                epilog="Example:\n  kvlab calc llama-3.1-8b --context 128k\n"
                                       "  kvlab <verb> --help   (each verb shows its own example)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        q = sub.add_parser(verb.NAME, help=verb.HELP, description=verb.HELP, formatter_class=RAW,
                           epilog=f"Example:\n  {verb.EXAMPLE}")
        verb.add_arguments(q)
        q.set_defaults(func=verb.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
