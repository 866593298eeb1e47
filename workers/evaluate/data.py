"""JSONL evaluation sets, validated line by line (errors name the file and the line).

Formats (DESIGN.md):

- reward prompts: ``{"prompt": str}``
- preference pairs: ``{"prompt": str, "chosen": str, "rejected": str}``
- exact_match: ``{"prompt": str, "answer": str}``
- multiple_choice: ``{"prompt": str, "choices": [str, ...], "answer": int}`` (an index; each
  choice is appended to the prompt verbatim, so the data carries its own separator)
- perplexity: ``{"text": str}``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service.errors import NotFoundError, SpecError

FIELDS: dict[str, dict[str, type]] = {
    "prompts": {"prompt": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str},
    "exact_match": {"prompt": str, "answer": str},
    "multiple_choice": {"prompt": str, "choices": list, "answer": int},
    "perplexity": {"text": str},
}


def load_jsonl(path: str | Path, kind: str) -> list[dict]:
    """Read and validate a JSONL file of ``kind`` (a key of :data:`FIELDS`)."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"{kind} data {file} does not exist")
    fields = FIELDS[kind]
    records: list[dict] = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {file}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise SpecError(f"{where}: expected a JSON object")
        for name, typ in fields.items():
            if name not in record:
                raise SpecError(f"{where}: missing field {name!r} (a {kind} line needs "
                                f"{', '.join(fields)})")
            value = record[name]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise SpecError(f"{where}: field {name!r} must be {typ.__name__}, "
                                f"got {type(value).__name__}")
        if kind == "multiple_choice":
            choices = record["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise SpecError(f"{where}: 'choices' must be a list of at least two strings")
            if not 0 <= record["answer"] < len(choices):
                raise SpecError(f"{where}: answer {record['answer']} is out of range for "
                                f"{len(choices)} choices (answer is a 0-based index)")
        records.append(record)
    if not records:
        raise SpecError(f"{file} holds no {kind} records")
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
