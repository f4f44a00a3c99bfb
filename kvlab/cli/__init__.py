"""The ``kvlab`` command line: one module per verb, each with ``NAME``, ``HELP``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args) -> int``; a new verb is one module plus one entry in ``VERBS``.

Every verb prints a readable table by default; with ``--json`` standard output holds only one JSON object
(tables, notices and progress bars go to standard error). Errors from the library (ValueError) print
``kvlab: error: <message>`` and exit with 2. A verb imports the model side (torch, tokenizers, matplotlib) inside
``run``, so ``kvlab calc``, ``compare``, ``fit`` and every ``--help`` start without it (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from kvlab.cli import ablate, bench, calc, chat, compare, evaluate, fit, generate, inspect, presets, retrofit, train
from kvlab.cli.common import describe_error, setup_threads
from kvlab.preflight import forced

VERBS = [calc, compare, inspect, fit, generate, chat, evaluate, bench, train, ablate, retrofit, presets]

RAW = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb in ``VERBS``; each verb's ``--help`` ends with its example."""
    p = argparse.ArgumentParser(prog="kvlab", formatter_class=RAW,
                                description="KV-cache calculator, inspector, generator and benchmark.",
                                epilog="Example:\n  kvlab calc llama-3.1-8b --context 128k\n"
                                       "  kvlab <verb> --help   (each verb shows its own example)\n"
                                       "--debug (anywhere) or KVLAB_DEBUG=1: print the traceback of an error")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        q = sub.add_parser(verb.NAME, help=verb.HELP, description=verb.HELP, formatter_class=RAW,
                           epilog=f"Example:\n  {verb.EXAMPLE}")
        verb.add_arguments(q)
        q.set_defaults(func=verb.run)
    return p


DEBUG_ENV = "KVLAB_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or input error or any other failure, 130 interrupted).

    Every error prints one line ``kvlab: error: ...`` on standard error, without a traceback unless ``--debug``
    (anywhere on the command line) or the environment variable ``KVLAB_DEBUG=1`` asks for it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        with forced() if getattr(args, "force", False) else contextlib.nullcontext():
            setup_threads(args)  # verbs that compute: --threads or the default, before torch starts its threads
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001  (every failure is one line and exit code 2; --debug shows where)
        if debug:
            traceback.print_exc()
        print(f"kvlab: error: {describe_error(e)}", file=sys.stderr)
        if not debug and not isinstance(e, ValueError):
            print(f"kvlab: (run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
