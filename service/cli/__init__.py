"""The ``hmaopt`` command line: the parser and ``main``. Exit codes come from the error tree
(service/errors.py, ``ExitCode``): ``main`` turns every HmaoptError, argparse's usage
errors included, into its group's code, the same in every command.

The commands live in one module per family: ``data`` (merge, search, world build: they run
torch in this process), ``admin`` (db, token), ``stack`` (serve, worker, scheduler, demo),
``remote`` (submit, pipeline) and ``jobs`` (jobs list|show|cancel|export|trials): REST
clients; ``helpers`` and ``output`` (human text or --json) hold what they share. Nothing
imported here pulls in torch, transformers or optuna.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from service._version import __version__
from service.cli import admin, data, jobs, remote, stack
from service.cli.helpers import Parser, follow_job, format_summary, parse_ratios, parse_size
from service.cli.output import print_error, print_interrupted, wants_json
from service.errors import HmaoptError
from service.settings import get_settings

__all__ = ["build_parser", "follow_job", "format_summary", "main", "parse_ratios", "parse_size"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hmaopt", description=(
        "Heterogeneous Model Averaging ratio optimizer. A ratio is the weight on the ALIGNED "
        "model: merged = base + ratio * (aligned - base); 0 = base, 1 = aligned."))
    parser.add_argument("--version", action="version", version=f"hmaopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    # in the order `hmaopt --help` lists them
    for add in (data.add_merge, data.add_search, data.add_world, admin.add_db, admin.add_token,
                stack.add_serve, stack.add_worker, remote.add_submit, jobs.add_jobs,
                stack.add_scheduler, remote.add_pipeline, stack.add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else get_settings().log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return args.handler(args)
    except HmaoptError as exc:
        print_error(exc, as_json=wants_json(args, argv))
        return exc.exit_code
    except KeyboardInterrupt:
        return print_interrupted(as_json=wants_json(args, argv))
