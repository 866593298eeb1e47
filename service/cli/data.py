"""The data-plane commands, run in this process: ``hmaopt merge``, ``hmaopt search`` and
``hmaopt world build``.

Their handlers import ``workers`` (and so torch) and optuna inside the function, so that
building the parser, and every control-plane command, starts without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError
from tqdm.auto import tqdm

from service.cli.helpers import (add_command, add_group, add_progress_flag, format_summary,
                                 parse_ratios, parse_size, show_progress)
from service.errors import ConflictError, NotFoundError, SpecError
from service.settings import get_settings
from service.spec import GroupSpec, JobSpec, load_spec, spec_error_from_validation


def add_merge(sub) -> None:
    merge = add_command(sub, "merge", merge_command,
                        help="merge two checkpoints with per-group ratios")
    merge.add_argument("--base", required=True, help="pre-RLHF checkpoint folder (ratio 0)")
    merge.add_argument("--aligned", required=True, help="post-RLHF checkpoint folder (ratio 1)")
    merge.add_argument("--groups", default="blocks:3",
                       help="uniform | layers | blocks[:K] | custom:B1,B2,... (default blocks:3)")
    merge.add_argument("--ratios", required=True, type=parse_ratios,
                       help="comma-separated ratios, one per group slot, weights on the aligned model")
    merge.add_argument("--out", required=True, help="output folder (created atomically)")
    merge.add_argument("--split-attn-mlp", action="store_true",
                       help="two ratios per group: attention then MLP")
    merge.add_argument("--non-layer", default="nearest",
                       choices=["nearest", "mean", "base", "aligned", "own"],
                       help="ratio rule for embeddings, final norm and head (default nearest)")
    merge.add_argument("--allow-extrapolation", action="store_true",
                       help="accept ratios outside [0, 1]")
    merge.add_argument("--dtype", default="auto",
                       help="output dtype: auto (as the checkpoints), float32, bfloat16, float16")
    merge.add_argument("--max-shard-size", type=parse_size, default=None,
                       help="largest shard, e.g. 2GB or 500MB (default 5GB)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="read pickle .bin checkpoints (can run code: trusted files only)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_progress_flag(merge)


def add_search(sub) -> None:
    search = add_command(sub, "search", search_command,
                         help="run a merge-ratio search in-process")
    search.add_argument("spec", help="job spec file (YAML or JSON)")
    search.add_argument("--storage", default=None,
                        help="Optuna storage URL, e.g. sqlite:///hmaopt.db or "
                        "postgresql://host/db (default: in memory, nothing kept)")
    search.add_argument("--study", default=None,
                        help="study name (default hmaopt:<spec name>)")
    search.add_argument("--resume", action="store_true",
                        help="continue an existing study of that name up to n_trials")
    search.add_argument("--json", dest="json_out", default=None,
                        help="write the result as JSON to this file ('-' for stdout)")
    search.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    search.add_argument("--trials", type=int, default=None, help="override search.n_trials")
    search.add_argument("--sampler", default=None,
                        choices=["tpe", "gp", "cmaes", "nsga2", "random"],
                        help="override search.sampler")
    search.add_argument("--seed", type=int, default=None, help="override search.seed")
    add_progress_flag(search)


def add_world(sub) -> None:
    world = add_group(sub, "world", help="the reference world (small real models and data)")
    build = add_command(world, "build", world_build_command,
                        help="train the reference world on CPU (a few minutes)")
    build.add_argument("dir", help="output folder")
    build.add_argument("--overwrite", action="store_true", help="rebuild an existing folder")
    build.add_argument("--reuse", action="store_true",
                       help="keep an existing world of this version (build only when missing)")
    build.add_argument("--seed", type=int, default=0, help="seed of data and training")
    add_progress_flag(build)


def merge_command(args: argparse.Namespace) -> int:
    """Write lerp(base, aligned, ratio_of_group) as a new Hugging Face checkpoint with
    hma_manifest.json."""
    from workers.export import export_merge  # torch-free for safetensors checkpoints

    settings = get_settings()
    spec = GroupSpec.parse_arg(args.groups, split_attn_mlp=args.split_attn_mlp,
                               non_layer=args.non_layer)
    if not args.ratios:
        raise SpecError("give at least one ratio", field="ratios")
    result = export_merge(
        args.base, args.aligned, args.out, spec, args.ratios,
        allow_extrapolation=args.allow_extrapolation,
        max_shard_bytes=args.max_shard_size or settings.max_shard_bytes,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle or settings.allow_pickle,
        overwrite=args.overwrite,
        progress=show_progress(args),
    )
    ratios = result.manifest["ratios"]
    print(f"merged ({spec.describe()}; ratio = weight on the aligned model): "
          + ", ".join(f"{k}={v:g}" for k, v in ratios.items()))
    print(f"wrote {result.out} ({len(result.shards)} shard(s), {result.bytes_written / 1e6:.1f} MB, "
          f"{result.seconds:.1f} s)")
    return 0


def search_command(args: argparse.Namespace) -> int:
    """Search per-group ratios that maximise the reward with tax <= budget, the
    vanilla-averaging baseline included. Exit code 0 when a feasible merge was found, 2 when
    none was (or the spec is invalid); other errors exit with their group's code (3 not
    found, 4 conflict, 7 checkpoint, 9 evaluation)."""
    spec = load_spec(args.spec)
    if args.json_out not in (None, "-"):  # fail now, not after the search
        folder = Path(args.json_out).resolve().parent
        if not folder.is_dir():
            raise NotFoundError(f"--json: folder {folder} does not exist")
    overrides = {k: v for k, v in (("n_trials", args.trials), ("sampler", args.sampler),
                                   ("seed", args.seed)) if v is not None}
    if overrides:
        try:
            spec = JobSpec.model_validate(
                {**spec.model_dump(), "search": {**spec.search.model_dump(), **overrides}})
        except ValidationError as exc:
            raise spec_error_from_validation(exc) from exc
    import optuna

    from workers.search import jsonable, run_search

    if not args.verbose:  # the summary says what Optuna's INFO lines would
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"search {spec.name!r}: {spec.search.sampler}, {spec.search.n_trials} trials, "
          f"groups {spec.groups.describe()}, tax budget {spec.tax.budget:g}", file=sys.stderr)
    result = run_search(spec, storage=args.storage, name=args.study, resume=args.resume,
                        device=args.device, progress=show_progress(args),
                        log_fn=lambda msg: print(msg, file=sys.stderr))
    payload = jsonable(result.to_dict())
    text = format_summary(payload)
    if args.json_out == "-":
        print(json.dumps(payload, indent=2, allow_nan=False))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json_out:
            try:
                Path(args.json_out).write_text(json.dumps(payload, indent=2, allow_nan=False)
                                               + "\n")
            except OSError as exc:
                raise ConflictError(f"cannot write --json {args.json_out}: {exc}") from exc
    if args.storage is None:
        print("note: the study was kept in memory only; pass --storage sqlite:///FILE.db to "
              "keep it", file=sys.stderr)
    return 0 if result.feasible else 2


def world_build_command(args: argparse.Namespace) -> int:
    """Train a small base LM with three skills, an aligned model that forgets them, a style
    reward model, eval sets and a ready job spec (DIR/spec.yaml)."""
    from workers.world import WorldConfig, build_world, load_world_info

    if args.reuse and (info := load_world_info(args.dir)) is not None:
        print(f"reusing the reference world in {args.dir} (built in {info['seconds']:.0f} s)")
        return 0

    bar = tqdm(total=0, unit="step", dynamic_ncols=True) if show_progress(args) else None
    current = {"stage": None}

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if bar is None:
            if step == steps:
                print(f"{stage}: {steps} steps, loss {loss:.3f}", file=sys.stderr)
            return
        if current["stage"] != stage:
            current["stage"] = stage
            bar.reset(total=steps)
            bar.set_description(stage)
        bar.n = step
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=True)

    try:
        info = build_world(args.dir, WorldConfig(seed=args.seed),
                           overwrite=args.overwrite or args.reuse, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    base, aligned = info["skills"]["base"], info["skills"]["aligned"]
    print(f"built the reference world in {args.dir} ({info['seconds']:.0f} s)")
    print(f"  skills, base -> aligned: addition {base['addition']:.2f} -> {aligned['addition']:.2f}, "
          f"facts {base['facts']:.2f} -> {aligned['facts']:.2f}, text perplexity "
          f"{base['text']:.2f} -> {aligned['text']:.2f}")
    print(f"  style reward, base -> aligned: {info['reward']['base']:.2f} -> "
          f"{info['reward']['aligned']:.2f}")
    print(f"  job spec: {args.dir}/spec.yaml  (hmaopt search {args.dir}/spec.yaml)")
    return 0
