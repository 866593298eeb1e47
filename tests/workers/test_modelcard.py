"""An export as a Hugging Face model (workers/modelcard.py, workers/export.py): its card read
back by huggingface_hub, its reproduce command run through the CLI, its modes under a umask."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from service.cli import main
from service.spec import GroupSpec
from tests.models import make_char_lm, make_tiny
from workers.export import MANIFEST, export_merge
from workers.modelcard import CARD, job_section, spec_digest

BLOCKS2 = GroupSpec(scheme="blocks", k=2)


def _weights(folder: Path) -> dict[str, bytes]:
    """The bytes of every file that carries or places the weights."""
    names = [p.name for p in folder.iterdir()
             if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json",
                                                          "config.json")]
    return {n: (folder / n).read_bytes() for n in sorted(names)}


def _reproduce(manifest: dict, out: Path) -> list[str]:
    """The manifest's reproduce command as CLI arguments, writing to ``out`` instead."""
    argv = shlex.split(manifest["reproduce"])
    assert argv[:2] == ["hmaopt", "merge"] and argv[-2] == "--out"
    return argv[1:-1] + [str(out)]


def test_card_of_a_plain_merge_loads_with_huggingface_hub(tmp_path, llama_pair):
    base, aligned = llama_pair
    spec = GroupSpec(scheme="blocks", k=2, split_attn_mlp=True, non_layer="own")
    res = export_merge(base, aligned, tmp_path / "merged", spec, (0.1, 0.2, 0.3, 0.4, 0.9))
    AutoModelForCausalLM.from_pretrained(res.out)  # a Hugging Face model, the card beside it
    card = ModelCard.load(res.out / CARD)
    data = card.data.to_dict()
    assert data["base_model"] == [str(base.absolute()), str(aligned.absolute())]
    assert data["base_model_relation"] == "merge" and data["library_name"] == "transformers"
    assert {"merge", "hmaopt"} <= set(data["tags"])
    merge = data["hmaopt"]["merge"]
    assert merge["ratios"] == {"block0.attn": 0.1, "block0.mlp": 0.2, "block1.attn": 0.3,
                               "block1.mlp": 0.4, "non_layer": 0.9}
    assert (merge["groups"], merge["split_attn_mlp"], merge["non_layer"]) == \
        ("blocks:2", True, "own")
    assert "weight on the aligned" in merge["ratio_convention"]
    assert merge["method"].startswith("hma")
    assert "job" not in data["hmaopt"] and "figures" not in data["hmaopt"]  # none chose them
    assert "Given by hand" in card.text and "| block1.mlp | 2-3 | 0.4 |" in card.text
    manifest = json.loads((res.out / MANIFEST).read_text())
    assert manifest["job"] is None and manifest["card"] == CARD
    assert data["hmaopt"]["reproduce"] == manifest["reproduce"] in card.text


@pytest.mark.parametrize("case", ["blocks", "sharded-bf16", "extrapolated", "torch-path"])
def test_reproduce_command_writes_the_same_weights(tmp_path, llama_pair, case):
    """The manifest's `hmaopt merge` line, run through the CLI, writes the same bytes."""
    base, aligned = llama_pair
    kwargs: dict = {}
    if case == "blocks":  # ratios whose shortest text has many digits
        spec, ratios = BLOCKS2, (0.1 + 0.2, 1 / 3)
    elif case == "sharded-bf16":
        spec, ratios = GroupSpec(scheme="uniform"), (0.7,)
        kwargs = dict(dtype="bfloat16", max_shard_bytes=20_000)
    elif case == "extrapolated":
        spec = GroupSpec(scheme="custom", boundaries=(1, 3), non_layer="mean")
        ratios, kwargs = (-0.25, 0.5, 1.2), dict(allow_extrapolation=True)
    else:  # float64 checkpoints take the torch writer
        base = make_tiny(tmp_path / "b64", "llama", seed=0, dtype=torch.float64)
        aligned = make_tiny(tmp_path / "a64", "llama", seed=1, dtype=torch.float64)
        spec, ratios = GroupSpec(scheme="layers"), (0.1, 0.35, 0.6, 0.85)
    res = export_merge(base, aligned, tmp_path / "first", spec, ratios, **kwargs)
    argv = _reproduce(res.manifest, tmp_path / "again")
    assert main(argv) == 0, argv
    first, again = _weights(res.out), _weights(tmp_path / "again")
    assert first == again and any(n.endswith(".safetensors") for n in first)
    if case == "sharded-bf16":
        assert len(res.shards) > 1 and "--max-shard-size 20KB" in res.manifest["reproduce"]
        assert "--dtype bfloat16" in res.manifest["reproduce"]
    if case == "extrapolated":
        assert "--ratios=-0.25,0.5,1.2" in res.manifest["reproduce"]
        assert "--allow-extrapolation" in res.manifest["reproduce"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("dtype", ["float32", "float64"])  # the stream's writer, torch's
def test_modes_follow_the_umask_like_save_pretrained(tmp_path, umask, dtype):
    """Folder 0777 and files 0666 less the umask (as save_pretrained makes its folder, config
    and tokenizer files), though the source files are 0600."""
    pair = []
    for name, seed in (("base", 0), ("aligned", 1)):
        folder = make_char_lm(tmp_path / name, seed=seed)
        if dtype == "float64":
            make_tiny(folder, "llama", seed=seed, dtype=torch.float64,
                      **_char_overrides(folder))
        for f in folder.iterdir():
            f.chmod(0o600)
        folder.chmod(0o700)
        pair.append(str(folder))
    script = textwrap.dedent(f"""
        import json, os
        from pathlib import Path
        os.umask({umask})
        from service.spec import GroupSpec
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from workers.export import export_merge
        out = Path({str(tmp_path / 'exports' / 'merged')!r})
        export_merge({pair[0]!r}, {pair[1]!r}, out, GroupSpec(scheme="blocks", k=2), (0.2, 0.8))
        ref = out.parent / "saved"
        AutoModelForCausalLM.from_pretrained(out).save_pretrained(ref)
        AutoTokenizer.from_pretrained(out).save_pretrained(ref)
        modes = lambda d: {{"dir": d.stat().st_mode & 0o777,
                            **{{f.name: f.stat().st_mode & 0o777 for f in d.iterdir()}}}}
        print(json.dumps({{"export": modes(out), "saved": modes(ref),
                          "parent": out.parent.stat().st_mode & 0o777}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads(proc.stdout.strip().splitlines()[-1])
    exported, saved = modes["export"], modes["saved"]
    assert {CARD, MANIFEST, "model.safetensors", "config.json", "tokenizer.json"} <= set(exported)
    assert exported.pop("dir") == saved.pop("dir") == modes["parent"] == 0o777 & ~umask
    assert set(exported.values()) == {0o666 & ~umask}, exported
    # save_pretrained's own files, but its weights: safetensors 0.8's save_file makes them 0600
    assert {saved[n] for n in saved if not n.endswith(".safetensors")} == {0o666 & ~umask}
    assert not list((tmp_path / "exports").glob(".merged*"))  # no temporary folder left


def _char_overrides(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: config[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}


def test_job_section_keeps_only_the_exported_trial_s_figures(tmp_path):
    data = tmp_path / "pref.jsonl"
    data.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n')
    spec = {"name": "j", "reward": {"type": "preference", "data": str(data)},
            "tax": {"budget": 0.1, "tasks": [
                {"name": "t", "type": "perplexity", "data": str(tmp_path / "gone.jsonl")}]}}
    result = {"best": {"trial": 7, "kind": "search", "reward": 1.5, "reward_se": 0.1,
                       "tax": 0.05, "tax_se": 0.01, "n_reward": 10, "n_tax": 20,
                       "holdout": {"reward": 1.4, "reward_se": 0.2, "tax": 0.06, "tax_se": 0.02,
                                   "held_out": False}},
              "gain": 0.3, "gain_ci95": [0.1, 0.5], "flags": [{"code": "x", "message": "m"}]}
    section = job_section({"id": "abc", "spec": spec, "result": result, "trial": 7})
    f = section["figures"]
    assert (f["search"]["reward"], f["search"]["tax_se"], f["budget"]) == (1.5, 0.01, 0.1)
    assert f["holdout"]["held_out"] is False and f["gain_ci95"] == [0.1, 0.5]
    assert section["spec_sha256"] == spec_digest(spec) and section["flags"][0]["code"] == "x"
    import hashlib

    assert section["data"]["reward.data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    gone = section["data"]["tax.tasks.0.data"]
    assert gone["sha256"] is None and "missing" in gone["note"] and gone["task"] == "t"
    other = job_section({"id": "abc", "spec": spec, "result": result, "trial": 3})
    assert other["trial"] == 3 and other["figures"]["search"] is None  # not trial 3's figures
    assert other["figures"]["gain"] == 0.3
