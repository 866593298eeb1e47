"""JSONL evaluation sets, validated line by line (errors name the file and the line), and
their deterministic split into search, validation and holdout parts.

The formats and the reader are service/records.py's (the API checks submitted data with
them too).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service.errors import SpecError
from service.records import FIELDS, read_records

__all__ = ["FIELDS", "load_jsonl", "split_holdout", "split_parts"]


def load_jsonl(path: str | Path, kind: str, *, field: str | None = None) -> list[dict]:
    """Read and validate a JSONL file of ``kind`` (a key of :data:`FIELDS`); ``field`` (the
    spec field naming the file) goes into the errors."""
    records = [record for _, record in read_records(path, kind, field=field)]
    if not records:
        raise SpecError(f"{path} holds no {kind} records", field=field)
    return records


def split_holdout(records: list[dict], fraction: float, *, seed: str) -> tuple[list[dict], list[dict]]:
    """Deterministic split into (search, holdout) by a hash of each record and ``seed``.

    The same record always lands on the same side, whatever the order of the file. With
    ``fraction`` 0 there is no holdout. Each side keeps at least one record when possible.
    """
    if fraction <= 0 or len(records) < 2:
        return list(records), []

    def key(r: dict) -> float:
        digest = hashlib.sha256((seed + json.dumps(r, sort_keys=True)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ranked = sorted(records, key=key)
    n_hold = min(max(1, round(len(records) * fraction)), len(records) - 1)
    holdout_ids = {id(r) for r in ranked[:n_hold]}
    search = [r for r in records if id(r) not in holdout_ids]
    holdout = [r for r in records if id(r) in holdout_ids]
    return search, holdout



def split_parts(records: list[dict], holdout_fraction: float, validation_fraction: float, *,
                seed: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic split into (search, validation, holdout): the holdout as
    :func:`split_holdout` cuts it, then ``validation_fraction`` of all records out of the
    rest (by another hash), the search part what remains."""
    rest, holdout = split_holdout(records, holdout_fraction, seed=seed)
    share = validation_fraction / (1 - holdout_fraction) if validation_fraction > 0 else 0.0
    search, validation = split_holdout(rest, share, seed=f"{seed}:validation")
    return search, validation, holdout
