"""The reference world: deterministic, a real alignment tax, and a search that beats vanilla."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from service.spec import load_spec
from tests.service.test_cli import hmaopt
from tests.models import read_folder
from workers.world import WorldConfig, build_world, make_data

TINY = dict(layers=2, hidden=32, intermediate=64, pretrain_steps=4, align_steps=3,
            reward_steps=3, batch_size=8, seq_len=32)


def test_data_is_deterministic_and_well_formed():
    a, b = make_data(0), make_data(0)
    assert a.sets == b.sets and a.pretrain == b.pretrain and a.align == b.align
    assert make_data(1).facts != a.facts
    addition = {r["prompt"] for r in a.sets["addition"]}
    assert len(addition) == 60
    # the eval sentences are never pretraining lines; the alignment data asks half the facts
    assert not {r["text"] for r in a.sets["text"]} & set(a.pretrain)
    asked = {line.split("what about ")[1].split("?")[0] for line in a.align if "what about" in line}
    assert asked and len(asked) <= len(a.facts) // 2


def test_build_is_deterministic(tmp_path):
    build_world(tmp_path / "w1", WorldConfig(**TINY))
    build_world(tmp_path / "w2", WorldConfig(**TINY))
    for model in ("base", "aligned", "reward"):
        t1, t2 = read_folder(tmp_path / "w1/models" / model), read_folder(tmp_path / "w2/models" / model)
        assert t1.keys() == t2.keys()
        assert all((t1[k] == t2[k]).all() for k in t1)
    spec = load_spec(tmp_path / "w1/spec.yaml")
    assert spec.groups.describe() == "blocks:3" and spec.reward.type == "reward_model"
    assert (tmp_path / "w1/world.json").is_file() and not (tmp_path / ".w1.building").exists()


def test_world_has_a_real_alignment_tax(world):
    info = json.loads((world / "world.json").read_text())
    base, aligned = info["skills"]["base"], info["skills"]["aligned"]
    # pretrained skills, measurably there ...
    assert base["addition"] >= 0.9 and base["facts"] >= 0.9 and base["text"] < 1.6
    # ... addition and the grammar clearly forgotten by the aligned model (the memorised facts
    # survive alignment here), whose style reward is far higher
    assert aligned["addition"] <= base["addition"] - 0.1
    assert aligned["text"] >= base["text"] * 1.5
    assert info["reward"]["aligned"] > info["reward"]["base"] + 3


def test_search_on_the_reference_world_beats_vanilla_averaging(world, tmp_path):
    spec = yaml.safe_load((world / "spec.yaml").read_text())
    spec_file = world / "spec.yaml"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "result.json"
    proc = hmaopt("search", str(spec_file), "--trials", "24", "--storage", url, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    budget = spec["tax"]["budget"]
    assert r["feasible"] and r["best"]["tax"] <= budget
    assert r["best_uniform"]["tax"] <= budget
    assert r["best"]["reward"] >= r["best_uniform"]["reward"]
    assert r["best"]["holdout"]["reward"] is not None
    study = optuna.load_study(study_name="hmaopt:reference-world", storage=url)
    assert len(study.trials) == 24
    assert study.user_attrs["result"]["best"]["trial"] == r["best"]["trial"]
    best = study.trials[r["best"]["trial"]]
    assert best.user_attrs["ratios"] == pytest.approx(r["best"]["ratios"])
