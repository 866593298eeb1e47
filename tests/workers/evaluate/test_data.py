from __future__ import annotations

import json

import pytest

from service.errors import NotFoundError, SpecError
from workers.evaluate.data import load_jsonl, split_holdout


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_valid_multiple_choice(tmp_path):
    f = _write(tmp_path / "mc.jsonl", [{"prompt": "Capital of France:", "choices": [" Paris", " Rome"], "answer": 0}, ""])
    assert load_jsonl(f, "multiple_choice")[0]["choices"] == [" Paris", " Rome"]


@pytest.mark.parametrize("kind,line,message", [
    ("multiple_choice", {"prompt": "q", "choices": ["a", "b"], "answer": 2}, "line 2: answer 2 is out of range for 2 choices"),
    ("multiple_choice", {"prompt": "q", "choices": ["a"], "answer": 0}, "line 2: 'choices' must be a list of at least two"),
    ("multiple_choice", {"prompt": "q", "choices": ["a", "b"], "answer": True}, "line 2: field 'answer' must be int"),
    ("exact_match", {"prompt": "q"}, "line 2: missing field 'answer'"),
    ("perplexity", "{not json", "line 2: not valid JSON"),
    ("preference", ["a"], "line 2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, kind, line, message):
    good = {"multiple_choice": {"prompt": "q", "choices": ["a", "b"], "answer": 1},
            "exact_match": {"prompt": "q", "answer": "a"}, "perplexity": {"text": "t"},
            "preference": {"prompt": "p", "chosen": "c", "rejected": "r"}}[kind]
    f = _write(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(SpecError) as info:
        load_jsonl(f, kind)
    assert str(f) in str(info.value) and message in str(info.value)


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(SpecError, match="holds no perplexity records"):
        load_jsonl(tmp_path / "e.jsonl", "perplexity")
    with pytest.raises(NotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl", "perplexity")


def test_holdout_split_is_deterministic_and_order_free():
    records = [{"text": f"t{i}"} for i in range(100)]
    s1, h1 = split_holdout(records, 0.3, seed="job")
    s2, h2 = split_holdout(list(reversed(records)), 0.3, seed="job")
    assert len(h1) == 30 and len(s1) == 70
    assert sorted(r["text"] for r in h1) == sorted(r["text"] for r in h2)
    assert not {r["text"] for r in s1} & {r["text"] for r in h1}
    _, h3 = split_holdout(records, 0.3, seed="other")
    assert {r["text"] for r in h3} != {r["text"] for r in h1}
    assert split_holdout(records, 0.0, seed="job") == (records, [])
    assert [len(x) for x in split_holdout(records[:2], 0.9, seed="x")] == [1, 1]
