"""Reading the small files hmaopt takes as one mapping each (job specs, model configs,
weight indexes): the one place for their checks and messages (missing, unreadable, not a
mapping)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from service.errors import HmaoptError, NotFoundError


def read_mapping(file: Path, *, what: str, loads: Callable[[str], object],
                 errors: tuple[type[Exception], ...], error: type[HmaoptError],
                 missing: str = "is missing", shape: str = "a JSON object") -> dict:
    """The mapping in ``file`` (``what`` names it in messages): NotFoundError when it is not
    a file, ``error`` (chained) when it cannot be read or parsed (``loads`` raising one of
    ``errors``) or holds anything but a mapping."""
    if not file.is_file():
        raise NotFoundError(f"{what} {file} {missing}")
    try:
        data = loads(file.read_text())
    except (OSError, UnicodeDecodeError, *errors) as exc:
        raise error(f"cannot read {what} {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {file} must hold {shape}")
    return data
