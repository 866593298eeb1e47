"""How the commands print: human text by default; with ``--json`` the command's data as JSON
on stdout and any error as JSON on stderr::

    {"error": "not_found", "message": "job abc does not exist", "field": null, "exit_code": 3}

Progress and notes always go to stderr, so stdout stays the data alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from service.errors import ExitCode, HmaoptError, UsageError

JSON_HELP = "print the data as JSON on stdout (errors as JSON on stderr)"


def add_json_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser


def wants_json(args: argparse.Namespace | None, argv: Sequence[str] = ()) -> bool:
    """Whether the command was given --json (from the parsed arguments, or, when parsing
    failed, from the raw command line)."""
    if args is not None:
        return bool(getattr(args, "json", False))
    return any(a == "--json" or a.startswith("--json=") for a in argv)


def dumps(data) -> str:
    return json.dumps(data, indent=2, allow_nan=False, default=str)


def emit(args: argparse.Namespace, data, text: str | Callable[[], str] | None) -> None:
    """The command's output: ``data`` as JSON with --json, else ``text`` (a string, or a
    function giving it; None prints nothing)."""
    if wants_json(args):
        print(dumps(data))
    elif text is not None:
        print(text() if callable(text) else text)


def note(message: str) -> None:
    """A line for the person at the terminal (stderr, in both modes)."""
    print(message, file=sys.stderr)


def print_error(exc: HmaoptError, *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"error": exc.code, "message": str(exc),
                          "field": getattr(exc, "field", None),
                          "exit_code": int(exc.exit_code)}), file=sys.stderr)
        return
    if isinstance(exc, UsageError) and exc.usage:
        print(exc.usage.rstrip("\n"), file=sys.stderr)
    print(f"hmaopt: error: {exc}", file=sys.stderr)


def print_interrupted(*, as_json: bool = False) -> int:
    if as_json:
        print(json.dumps({"error": "interrupted", "message": "interrupted", "field": None,
                          "exit_code": int(ExitCode.INTERRUPTED)}), file=sys.stderr)
    else:
        print("hmaopt: interrupted", file=sys.stderr)
    return ExitCode.INTERRUPTED


def fixed(value: float | None, digits: int = 4) -> str:
    """A number at a fixed precision (``-`` when missing), for right-aligned columns."""
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str],
          right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; ``right[i]`` right-aligns column i (numbers)."""
    right = right or [False] * len(header)
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if ri else c.ljust(w)
                       for c, w, ri in zip(r, widths, right)).rstrip() for r in cells]
    return "\n".join(lines)
