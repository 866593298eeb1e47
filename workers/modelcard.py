"""What an export says of itself: its model card (README.md) and its job provenance.

Every export folder is a Hugging Face model: beside the weights, ``README.md`` is a model card
written with huggingface_hub's :class:`~huggingface_hub.ModelCard`. Its YAML metadata
(:class:`~huggingface_hub.ModelCardData`) holds ``base_model`` (both parents, with
``base_model_relation: merge``), ``tags`` and, under ``hmaopt``, the merge (method, formula,
the ratio convention, groups, per-slot ratios), the job and trial that chose the ratios, and
the figures behind them (reward, tax, budget, gains, holdout) with their standard errors and
95 % intervals where the job measured them.

The card is drawn from the manifest (workers/export.py), the one record of an export, whose
``job`` section comes from :func:`job_section`: the job's id, name and trial, its spec and the
spec's sha256, its data files with their sha256 (hashed when exported), the budget and the
figures. The manifest's ``reproduce`` is the one-line ``hmaopt merge`` command that writes
the same weights (:func:`reproduce_command`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.settings import DEFAULT_MAX_SHARD_BYTES
from service.spec import GroupSpec

CARD = "README.md"
TAGS = ("merge", "hmaopt", "hma", "model-averaging")
PAPER = "Lin et al., Mitigating the Alignment Tax of RLHF, EMNLP 2024"
#: the figures of the chosen trial a card and a manifest show, per data part
_PART_KEYS = ("reward", "reward_se", "tax", "tax_se", "n_reward", "n_tax", "feasible",
              "held_out")


# ------------------------------------------------------------------------- the job's provenance

def job_provenance(job) -> dict:
    """What an export records of ``job`` (a ``hmaopt_jobs`` row, read in the caller's session):
    a plain dict for :func:`job_section`, so that the export runs outside the session."""
    def when(value) -> str | None:
        return value.isoformat(timespec="seconds") if value is not None else None

    status = getattr(job.status, "value", job.status)
    return {"id": job.id, "name": job.name, "status": status, "submitted_by": job.submitted_by,
            "created_at": when(job.created_at), "finished_at": when(job.finished_at),
            "trial": job.best_trial, "spec": job.spec, "result": job.result}


def job_section(job: Mapping[str, Any]) -> dict:
    """The manifest's ``job``: from :func:`job_provenance`'s dict (keys beyond ``spec`` and
    ``result`` are optional), the spec's digest and data files hashed now, and the figures of
    the exported trial."""
    spec = job.get("spec") or {}
    result = job.get("result") or {}
    best = result.get("best") or {}
    trial = job.get("trial", best.get("trial"))
    if best.get("trial") != trial:  # the result is of another trial: keep its job-wide parts
        best = {}
    tax = spec.get("tax") or {}
    figures = {
        "budget": tax.get("budget", result.get("budget")),
        "confidence": tax.get("confidence"),
        "search": _part(best) if best else None,
        "validation": _part(best.get("validation")),
        "holdout": _part(best.get("holdout")),
        "uniform": _uniform(result.get("best_uniform")),
        **{k: result.get(k) for k in ("gain", "gain_ci95", "n_gain", "holdout_gain",
                                       "holdout_gain_ci95", "n_holdout_gain")},
    }
    return {
        "id": job.get("id"), "name": job.get("name") or spec.get("name"),
        "status": job.get("status"), "submitted_by": job.get("submitted_by"),
        "created_at": job.get("created_at"), "finished_at": job.get("finished_at"),
        "trial": trial, "found_by": best.get("kind"), "chosen_by": best.get("chosen_by"),
        "mode": spec.get("mode", result.get("mode")), "study": result.get("study"),
        "spec_sha256": spec_digest(spec) if spec else None,
        "data": data_files(spec),
        "figures": figures,
        "flags": list(result.get("flags") or []),
        "spec": spec or None,
    }


def spec_digest(spec: Mapping) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no spaces)."""
    raw = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def data_files(spec: Mapping) -> dict[str, dict]:
    """Every data input of the spec by field (``reward.data``, ``tax.tasks.0.data``, ...):
    its path and the sha256 of the file as it is now (``None`` for a folder, such as a
    reward model, or a file that is gone, with a ``note``). An lm_eval task's YAML is hashed,
    not the data files it names."""
    out: dict[str, dict] = {}
    reward = spec.get("reward") or {}
    for key in ("model", "prompts", "data"):
        if reward.get(key):
            out[f"reward.{key}"] = _hashed(reward[key])
    if reward.get("function"):
        out["reward.function"] = {"function": reward["function"], "sha256": None,
                                  "note": "python function: not hashed"}
    for i, task in enumerate((spec.get("tax") or {}).get("tasks") or []):
        entry = _hashed(task["data"])
        entry.update(task=task.get("name"), type=task.get("type"))
        out[f"tax.tasks.{i}.data"] = entry
    return out


def _hashed(path: str) -> dict:
    from workers.checkpoint import sha256_file

    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    note = "folder: not hashed" if p.is_dir() else "missing when exported: not hashed"
    return {"path": str(p), "sha256": None, "note": note}


def _part(part: Mapping | None) -> dict | None:
    if not part:
        return None
    return {k: part[k] for k in _PART_KEYS if k in part}


def _uniform(uniform: Mapping | None) -> dict | None:
    if not uniform:
        return None
    return {k: uniform.get(k) for k in ("trial", "ratio", "reward", "reward_se", "tax", "tax_se")}


# ------------------------------------------------------------------------- the reproduce command

def reproduce_command(
    base_model: str | Path, aligned_model: str | Path, out: str | Path, spec: GroupSpec,
    ratios: Sequence[float], *, dtype: str | None, max_shard_bytes: int,
    extrapolated: bool, pickle: bool,
) -> str:
    """The ``hmaopt merge`` line that writes the same weights: every flag that shapes them,
    each ratio in Python's shortest round-trip form (so it parses back to the same float).

    ``dtype``: the asked output dtype's torch name, None for the checkpoints' own.
    """
    text = ",".join(repr(float(r)) for r in ratios)
    argv = ["hmaopt", "merge", "--base", str(base_model), "--aligned", str(aligned_model),
            "--groups", spec.describe()]
    if spec.split_attn_mlp:
        argv.append("--split-attn-mlp")
    argv += ["--non-layer", spec.non_layer]
    # "--ratios=-0.1,..." : a value starting with '-' must be joined to its flag
    argv += [f"--ratios={text}"] if text.startswith("-") else ["--ratios", text]
    if dtype is not None:
        argv += ["--dtype", dtype]
    if max_shard_bytes != DEFAULT_MAX_SHARD_BYTES:
        argv += ["--max-shard-size", _size_arg(max_shard_bytes)]
    if extrapolated:
        argv.append("--allow-extrapolation")
    if pickle:
        argv.append("--allow-pickle")
    argv += ["--out", str(out)]
    return shlex.join(argv)


def _size_arg(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# ------------------------------------------------------------------------- the card

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A merge of two checkpoints by heterogeneous model averaging (HMA; {{ paper }}), written by hmaopt {{ version }}: each group of decoder layers takes its own ratio.

> **Ratio convention.** A ratio is the weight on the **aligned** (post-RLHF) model:
> `merged = base + ratio * (aligned - base)` (`torch.lerp`); ratio 0 is the base model,
> 1 the aligned one. The paper's released code uses the opposite convention.

| | |
|---|---|
| base model (ratio 0) | `{{ base_model }}` |
| aligned model (ratio 1) | `{{ aligned_model }}` |
| architecture | {{ architecture }} |
| groups | {{ groups }} |
| tensors outside the layers | {{ non_layer }} |
| dtype | {{ dtype }} |

## Ratios

| slot | layers | ratio |
|---|---|---:|
{% for row in ratio_rows %}| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}
## How the ratios were chosen

{{ chosen }}
{% if figure_rows %}
| figure | reward | tax | n (reward / tax) |
|---|---:|---:|---:|
{% for row in figure_rows %}| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} | {{ row[3] }} |
{% endfor %}{% endif %}{% for line in figure_lines %}
- {{ line }}{% endfor %}
{% if data_rows %}
Data (sha256 when exported; an lm_eval task's YAML, not the files it names):

| input | path | sha256 |
|---|---|---|
{% for row in data_rows %}| {{ row[0] }} | `{{ row[1] }}` | {{ row[2] }} |
{% endfor %}{% endif %}
## Reproduce

The same weights, from the same checkpoints (`{{ manifest }}` holds the full record):

```sh
{{ reproduce }}
```

## Use

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{{ out }}")
```
"""


def write_card(folder: Path, manifest: Mapping[str, Any], *, out: Path, manifest_name: str) -> None:
    """Write the model card of an export (``folder``: the folder being written, to be renamed
    to ``out``) from its ``manifest``."""
    from huggingface_hub import ModelCard

    ModelCard.from_template(card_data(manifest), template_str=_TEMPLATE,
                            **_body(manifest, out, manifest_name)).save(folder / CARD)


def card_data(manifest: Mapping[str, Any]):
    """The card's YAML metadata."""
    from huggingface_hub import ModelCardData

    spec = manifest["spec"]
    merge = {
        "method": "linear (uniform: vanilla model averaging)" if spec["scheme"] == "uniform"
        else "hma (heterogeneous model averaging)",
        "formula": manifest["formula"], "ratio_convention": manifest["ratio_convention"],
        "base_model": manifest["base_model"], "aligned_model": manifest["aligned_model"],
        "groups": GroupSpec.model_validate(spec).describe(),
        "split_attn_mlp": spec["split_attn_mlp"], "non_layer": spec["non_layer"],
        "ratios": manifest["ratios"], "dtype": manifest["dtype"],
    }
    meta: dict[str, Any] = {"version": manifest["hmaopt_version"], "merge": merge}
    job = manifest.get("job")
    if job:
        meta["job"] = {k: job.get(k) for k in ("id", "name", "trial", "found_by", "chosen_by",
                                               "spec_sha256")}
        meta["figures"] = _drop_none(job["figures"])
        meta["flags"] = _codes(job["flags"])
    meta["reproduce"] = manifest["reproduce"]
    causal = manifest["architecture"].endswith("ForCausalLM")
    return ModelCardData(base_model=[manifest["base_model"], manifest["aligned_model"]],
                         base_model_relation="merge", library_name="transformers",
                         pipeline_tag="text-generation" if causal else None,
                         tags=list(TAGS), hmaopt=meta)


def _body(manifest: Mapping[str, Any], out: Path, manifest_name: str) -> dict:
    job = manifest.get("job")
    spec = manifest["spec"]
    layers = {g["name"]: g["layers"] for g in manifest["groups"]}
    rows = []
    for slot, ratio in manifest["ratios"].items():
        group = slot.split(".")[0]
        span = layers.get(group)
        rows.append((slot, _span(span) if span else "embeddings, final norm, head",
                     f"{ratio:.6g}"))
    kw = dict(
        title=Path(out).name, paper=PAPER, version=manifest["hmaopt_version"],
        base_model=manifest["base_model"], aligned_model=manifest["aligned_model"],
        architecture=manifest["architecture"],
        groups=GroupSpec.model_validate(spec).describe()
        + (" (attention and MLP apart)" if spec["split_attn_mlp"] else ""),
        non_layer=spec["non_layer"], dtype=manifest["dtype"], ratio_rows=rows,
        reproduce=manifest["reproduce"], manifest=manifest_name, out=out,
        figure_rows=[], figure_lines=[], data_rows=[],
    )
    if not job:
        kw["chosen"] = ("Given by hand to `hmaopt merge`: no search chose them, so no reward "
                        "or tax was measured.")
        return kw
    kw["chosen"] = (f"Job `{job['id']}` ({job['name']}), trial {job['trial']}"
                    + (f", found by {job['found_by']}" if job.get("found_by") else "")
                    + (f", chosen on the {job['chosen_by']} data" if job.get("chosen_by") else "")
                    + f"; mode {job.get('mode')}, spec sha256 `{(job.get('spec_sha256') or '')[:16]}`.")
    f = job["figures"]
    for label, key in (("search", "search"), ("validation", "validation"),
                       ("holdout", "holdout")):
        part = f.get(key)
        if part:
            held = "" if part.get("held_out", True) else " (not held out: search data)"
            kw["figure_rows"].append((label + held, _pm(part.get("reward"), part.get("reward_se")),
                                      _pm(part.get("tax"), part.get("tax_se")),
                                      f"{part.get('n_reward', '?')} / {part.get('n_tax', '?')}"))
    lines = kw["figure_lines"]
    budget = f"tax budget {f['budget']:g}" if f.get("budget") is not None else "no tax budget known"
    if f.get("confidence") is not None:
        budget += f" at confidence {f['confidence']:g}"
    lines.append(budget)
    u = f.get("uniform")
    if u and u.get("reward") is not None:
        lines.append(f"best uniform ratio {u['ratio']:.4g}: reward {_pm(u['reward'], u.get('reward_se'))}, "
                     f"tax {_pm(u['tax'], u.get('tax_se'))}")
    if f.get("gain") is not None:
        lines.append(f"gain over it {_ci(f['gain'], f.get('gain_ci95'), f.get('n_gain'))}")
    if f.get("holdout_gain") is not None:
        lines.append("holdout gain " + _ci(f["holdout_gain"], f.get("holdout_gain_ci95"),
                                           f.get("n_holdout_gain")))
    if job["flags"]:
        lines.append("flags: " + ", ".join(f"`{c}`" for c in _codes(job["flags"])))
    for field, d in job["data"].items():
        where = d.get("path") or d.get("function")
        kw["data_rows"].append((field, where, f"`{d['sha256'][:16]}`" if d.get("sha256")
                                else d.get("note", "")))
    return kw


def _codes(flags) -> list[str]:
    return [f.get("code") if isinstance(f, Mapping) else str(f) for f in flags]


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _pm(value, se) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g}"


def _ci(value, ci, n) -> str:
    text = f"{value:.4g}"
    if ci:
        text += f", 95 % interval [{ci[0]:.4g}, {ci[1]:.4g}]"
    return text + (f" (n = {n})" if n else "")


def _drop_none(value):
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value
