"""The reference world: deterministic, a real alignment tax, and a search that beats vanilla."""

from __future__ import annotations

import json
import math
import statistics

import optuna
import pytest
import yaml

from service.spec import load_spec
from tests.service.test_cli import hmaopt
from tests.models import read_folder
from workers.world import WorldConfig, build_world, make_data
from workers.world_data import N_ENTITIES, N_REWARD_PROMPTS, N_TAX_ITEMS

TINY = dict(layers=2, hidden=32, intermediate=64, pretrain_steps=4, chat_steps=2, align_steps=3,
            reward_steps=3, batch_size=8, seq_len=32)


def test_data_is_deterministic_and_well_formed():
    a, b = make_data(0), make_data(0)
    assert a.sets == b.sets and a.pretrain == b.pretrain and a.align == b.align
    assert make_data(1).facts != a.facts
    assert len({r["prompt"] for r in a.sets["addition"]}) == N_TAX_ITEMS == 300
    assert len({r["prompt"] for r in a.sets["reward_prompts"]}) == N_REWARD_PROMPTS >= 300
    assert len(a.facts) == N_ENTITIES
    for name, records in a.sets.items():
        fresh = a.fresh[name]
        assert len(records) >= 300 and len(fresh) == len(records), name
        # the fresh split: the same kind of records, none of them in the job's set
        assert fresh[0].keys() == records[0].keys(), name
        key = (lambda r: r.get("prompt", r.get("text")))
        assert len({key(r) for r in records + fresh}) == 2 * len(records), name
    # every eval sum is pretrained, as are all the facts (the skills being measured) ...
    assert {r["prompt"] + r["answer"] for r in a.sets["addition"] + a.fresh["addition"]} <= set(a.pretrain)
    # ... but the eval sentences (job and fresh) are never pretraining lines; the alignment
    # data asks half the facts
    assert not {r["text"] for r in a.sets["text"] + a.fresh["text"]} & set(a.pretrain)
    asked = {line.split("what about ")[1].split("?")[0] for line in a.align if "what about" in line}
    assert asked and len(asked) <= len(a.facts) // 2
    # the chat stage asks the same half of the facts, with plain answers
    chat_asked = {line.split("what about ")[1].split("?")[0] for line in a.chat
                  if "what about" in line}
    assert chat_asked and chat_asked <= set(list(a.facts)[: len(a.facts) // 2])
    assert a.chat == b.chat and not any("Yay!" in line for line in a.chat)
    assert all("Yay!" in line for line in a.align)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_preference_stage_trains_the_top_layers_and_the_head(arch):
    from workers.chartok import char_tokenizer
    from workers.world import _lm_class, _lm_config
    from workers.world_train import top_parameters

    cfg = WorldConfig(**dict(TINY, layers=3, arch=arch))
    model = _lm_class(cfg)(_lm_config(cfg, char_tokenizer()))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in top_parameters(model, 3, 1)}
    if arch == "llama":
        assert chosen and all(n.startswith(("model.layers.2.", "model.norm.", "lm_head."))
                              for n in chosen)
        assert "lm_head.weight" in chosen and "model.norm.weight" in chosen
    else:  # the tied head is the input embedding: it stays with the first block
        assert chosen and all(n.startswith(("transformer.h.2.", "transformer.ln_f."))
                              for n in chosen)
        assert "transformer.ln_f.weight" in chosen
    assert not any(".1." in n or ".0." in n or "embed" in n or "wte" in n for n in chosen)
    assert len(top_parameters(model, 3, 0)) == len(list(model.parameters()))


def test_reward_prompts_cover_the_trained_forms_and_are_half_about_names():
    from workers.world_data import question, trained_prompts

    data = make_data(0)
    job = [r["prompt"] for r in data.sets["reward_prompts"]]
    fresh = [r["prompt"] for r in data.fresh["reward_prompts"]]
    assert len(job) == len(fresh) == N_REWARD_PROMPTS
    assert not set(job) & set(fresh)
    trained = set(trained_prompts(data.facts))
    # trained_prompts is exactly what question() can ask ...
    rng = __import__("random").Random(3)
    assert {question(rng, data.facts)[0] for _ in range(50_000)} <= trained
    # ... and every one of them is a reward prompt of one split or the other
    assert trained <= set(job) | set(fresh)
    for prompts in (job, fresh):
        named = sum(p.startswith("Q: what about ") for p in prompts) / len(prompts)
        assert 0.4 < named < 0.6
        # no prompt is a pretraining or alignment line's question with its answer
        assert all(p.endswith("\nA:") for p in prompts)


def test_build_is_deterministic(tmp_path):
    cfg = dict(TINY, align_layers=1)  # the preference stage on the top one of 2 layers
    build_world(tmp_path / "w1", WorldConfig(**cfg))
    build_world(tmp_path / "w2", WorldConfig(**cfg))
    for model in ("base", "aligned", "reward"):
        t1, t2 = read_folder(tmp_path / "w1/models" / model), read_folder(tmp_path / "w2/models" / model)
        assert t1.keys() == t2.keys()
        assert all((t1[k] == t2[k]).all() for k in t1)
    # the chat stage moved every layer; the preference stage only the top layer, the final
    # norm and the head: against a build without it (0 steps), the rest is bit for bit equal
    build_world(tmp_path / "w3", WorldConfig(**dict(cfg, align_steps=0)))
    base = read_folder(tmp_path / "w1/models/base")
    aligned = read_folder(tmp_path / "w1/models/aligned")
    chat_only = read_folder(tmp_path / "w3/models/aligned")
    assert all(not (base[k] == chat_only[k]).all() for k in base if "layers.0." in k)
    top = ("model.layers.1.", "model.norm.", "lm_head.")
    for k in base:
        assert (aligned[k] == chat_only[k]).all() != k.startswith(top), k
    info = json.loads((tmp_path / "w1/world.json").read_text())
    assert info["version"] == 4 and info["losses"]["align_final"] is not None
    assert json.loads((tmp_path / "w3/world.json").read_text())["losses"]["align_final"] is None
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


def test_world_figures_are_precise_and_the_fresh_split_is_disjoint(world):
    """Reward standard error well under a tenth of the base-to-aligned gap and a tax
    resolution under a tenth of the budget, on the search part (taken as half of a set)."""
    info = json.loads((world / "world.json").read_text())
    spec = yaml.safe_load((world / "spec.yaml").read_text())
    budget = spec["tax"]["budget"]

    def read(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    names = sorted(p.stem for p in (world / "data").glob("*.jsonl"))
    assert names == sorted(p.stem for p in (world / "data" / "fresh").glob("*.jsonl"))
    for name in names:
        job, fresh = read(world / "data" / f"{name}.jsonl"), read(world / "data/fresh" / f"{name}.jsonl")
        assert info["sizes"][name] == {"job": len(job), "fresh": len(fresh)}
        assert len(fresh) == len(job) >= 300
        dumped = {json.dumps(r, sort_keys=True) for r in job}
        assert len(dumped) == len(job) and not dumped & {json.dumps(r, sort_keys=True) for r in fresh}

    # the reward: the sd of the pooled per-prompt rewards of base and aligned (that of a
    # model half-way between the two, the noisiest case) over sqrt(search prompts)
    per_prompt = info["reward_per_prompt"]
    assert len(per_prompt["base"]) == len(per_prompt["aligned"]) == info["sizes"]["reward_prompts"]["job"]
    assert statistics.fmean(per_prompt["base"]) == pytest.approx(info["reward"]["base"], abs=1e-3)
    gap = info["reward"]["aligned"] - info["reward"]["base"]
    n_search = info["sizes"]["reward_prompts"]["job"] // 2
    se = statistics.stdev(per_prompt["base"] + per_prompt["aligned"]) / math.sqrt(n_search)
    assert se < gap / 10, (se, gap)

    # the tax: one item of an accuracy task moves its tax by 1 / (n * base accuracy); one
    # text whose per-token NLL moves by 1 nat moves the perplexity tax by about its share of
    # the tokens (char tokens: its length), at worst the longest text over the shortest half
    base = info["skills"]["base"]
    for task in spec["tax"]["tasks"]:
        records = read(world / task["data"])
        n = len(records) // 2
        if task["type"] == "perplexity":
            lengths = sorted(len(r["text"]) for r in records)
            resolution = lengths[-1] / sum(lengths[:n])
        else:
            resolution = 1 / (n * base[task["name"]])
        assert resolution < budget / 10, (task["name"], resolution)

    # the fresh split behaves as the job's: the same skills, within a few items
    fresh = info["fresh"]["skills"]
    for model in ("base", "aligned"):
        for task in ("addition", "facts"):
            assert abs(fresh[model][task] - info["skills"][model][task]) < 0.1
    assert info["fresh"]["reward"]["aligned"] > info["fresh"]["reward"]["base"] + 3


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
    # 24, and at most 3 uniform trials the answer stage added (vanilla averaging tuned to the
    # budget on the pooled search + validation tax: workers/answer.py)
    added = [t for t in study.trials if t.user_attrs.get("answer_stage")]
    assert len(study.trials) - len(added) == 24 and len(added) <= 3
    assert all(t.user_attrs["kind"] == "uniform" for t in added)
    assert study.user_attrs["result"]["best"]["trial"] == r["best"]["trial"]
    best = study.trials[r["best"]["trial"]]
    assert best.user_attrs["ratios"] == pytest.approx(r["best"]["ratios"])


# --------------------------------------------------------------------------- the gpt2 world

GPT2_TINY = dict(TINY, layers=3, arch="gpt2")  # 3 layers: the spec's blocks:3 fits


@pytest.fixture(scope="module")
def gpt2_worlds(tmp_path_factory):
    """Two TINY gpt2 worlds built alike. The skill and reward figures of world.json are
    stubbed (they cost a minute of generation and no search reads them): the models, data
    and spec are built for real."""
    import workers.world as world_mod

    root = tmp_path_factory.mktemp("gpt2-world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(world_mod, "skill_scores",
                   lambda *a, **k: {"addition": 0.0, "facts": 0.0, "text": 1.0})
        mp.setattr(world_mod, "prompt_rewards", lambda m, t, rm, records, **k: [0.0] * len(records))
        for name in ("w1", "w2"):
            build_world(root / name, WorldConfig(**GPT2_TINY))
    return root / "w1", root / "w2"


def test_gpt2_world_builds_deterministically_with_tied_embeddings(gpt2_worlds):
    w1, w2 = gpt2_worlds
    for model in ("base", "aligned", "reward"):
        t1, t2 = read_folder(w1 / "models" / model), read_folder(w2 / "models" / model)
        assert t1.keys() == t2.keys()
        assert all((t1[k] == t2[k]).all() for k in t1), model
    for model in ("base", "aligned"):
        config = json.loads((w1 / "models" / model / "config.json").read_text())
        assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is True
        tensors = read_folder(w1 / "models" / model)
        # one embedding tensor, no separate head; GPT-2's Conv1D projections (in, out)
        assert "transformer.wte.weight" in tensors and "lm_head.weight" not in tensors
        assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    base, aligned = read_folder(w1 / "models/base"), read_folder(w1 / "models/aligned")
    assert not (base["transformer.wte.weight"] == aligned["transformer.wte.weight"]).all()
    # the reward model is the reference world's Llama classifier
    assert json.loads((w1 / "models/reward/config.json").read_text())["model_type"] == "llama"
    spec = load_spec(w1 / "spec.yaml")
    assert spec.name == "gpt2-world" and spec.groups.describe() == "blocks:3"
    info = json.loads((w1 / "world.json").read_text())
    assert info["config"]["arch"] == "gpt2"


def test_llama_world_json_names_no_arch(tmp_path, monkeypatch):
    """The default recipe's world.json reads as before the arch option (no "arch" key), and
    a cached world of another arch is not taken for it."""
    import workers.world as world_mod
    from workers.world import load_world_info

    monkeypatch.setattr(world_mod, "skill_scores",
                        lambda *a, **k: {"addition": 0.0, "facts": 0.0, "text": 1.0})
    monkeypatch.setattr(world_mod, "prompt_rewards", lambda m, t, rm, records, **k: [0.0] * len(records))
    info = build_world(tmp_path / "w", WorldConfig(**TINY))
    assert "arch" not in info["config"]
    assert load_world_info(tmp_path / "w", "llama") is not None
    assert load_world_info(tmp_path / "w", "gpt2") is None
    with pytest.raises(Exception, match="arch 'opt'"):
        build_world(tmp_path / "x", WorldConfig(**TINY, arch="opt"))


def test_search_runs_on_the_gpt2_world(gpt2_worlds, tmp_path):
    """A hybrid search (gradient stage through the tied embedding and the Conv1D weights,
    then TPE) on the gpt2 world's own spec, its sets cut to 40 records to keep it fast."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(gpt2_worlds[0], world)
    for f in (world / "data").glob("*.jsonl"):
        f.write_text("".join(line + "\n" for line in f.read_text().splitlines()[:40]))
    spec = yaml.safe_load((world / "spec.yaml").read_text())
    spec["search"].update(strategy="hybrid", gradient_steps=3, n_trials=8)
    (world / "hybrid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "result.json"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = hmaopt("search", str(world / "hybrid.yaml"), "--storage", url, "--json", str(out))
    assert proc.returncode in (0, 10), proc.stderr  # 10: no feasible merge (random-ish models)
    r = json.loads(out.read_text())
    assert r["slots"] == ["block0", "block1", "block2"]
    assert r["stages"]["gradient"]["evaluations"] >= 1
    study = optuna.load_study(study_name="hmaopt:gpt2-world", storage=url)
    added = sum(bool(t.user_attrs.get("answer_stage")) for t in study.trials)  # at most 3
    assert len(study.trials) == 8 + added and added <= 3
    assert sum(s["evaluations"] for s in r["stages"].values()) == 8 + added
    assert r["gradient"]["seconds"] > 0 and len(r["gradient"]["ratios"]) == 3
