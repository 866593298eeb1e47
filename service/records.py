"""The JSONL record formats of hmaopt's data sets, and the one line-by-line reader of them.

Torch-free, so that the API checks a submitted job's data (service/admission.py) with the
same rules the worker loads it by (workers/evaluate/data.py). Errors name the file and the
line number, and the spec field when the caller gives one.

Formats (DESIGN.md):

- reward prompts: ``{"prompt": str}``
- preference pairs: ``{"prompt": str, "chosen": str, "rejected": str}``
- exact_match: ``{"prompt": str, "answer": str}``
- multiple_choice: ``{"prompt": str, "choices": [str, ...], "answer": int}`` (an index; each
  choice is appended to the prompt verbatim, so the data carries its own separator)
- perplexity: ``{"text": str}``
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from service.errors import NotFoundError, SpecError

FIELDS: dict[str, dict[str, type]] = {
    "prompts": {"prompt": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str},
    "exact_match": {"prompt": str, "answer": str},
    "multiple_choice": {"prompt": str, "choices": list, "answer": int},
    "perplexity": {"text": str},
}


def record_problem(record: object, kind: str) -> str | None:
    """What is wrong with one parsed line of a ``kind`` set (a key of :data:`FIELDS`), or
    None when it is a valid record."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    fields = FIELDS[kind]
    for name, typ in fields.items():
        if name not in record:
            return f"missing field {name!r} (a {kind} line needs {', '.join(fields)})"
        value = record[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            return f"field {name!r} must be {typ.__name__}, got {type(value).__name__}"
    if kind == "multiple_choice":
        choices = record["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            return "'choices' must be a list of at least two strings"
        if not 0 <= record["answer"] < len(choices):
            return (f"answer {record['answer']} is out of range for {len(choices)} choices "
                    "(answer is a 0-based index)")
    return None


def read_records(path: str | Path, kind: str, *, field: str | None = None,
                 max_lines: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a ``kind`` JSONL file, validated as
    read; the first ``max_lines`` lines only when given. SpecError (naming ``field``, the
    file and the line) at the first bad line; NotFoundError when the file is missing."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"{field + ': ' if field else ''}{kind} data {file} does not exist")
    try:
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if max_lines is not None and number > max_lines:
                    return
                if not line.strip():
                    continue
                where = f"{file}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{where}: not valid JSON ({exc.msg})", field=field) from exc
                problem = record_problem(record, kind)
                if problem is not None:
                    raise SpecError(f"{where}: {problem}", field=field)
                yield number, record
    except UnicodeDecodeError as exc:
        raise SpecError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        field=field) from exc
    except OSError as exc:
        raise SpecError(f"cannot read {file}: {exc.strerror or exc}", field=field) from exc
