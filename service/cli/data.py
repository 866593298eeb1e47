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
from typing import get_args

from pydantic import ValidationError
from tqdm.auto import tqdm

from service.cli.helpers import (add_command, add_group, add_progress_flag, format_summary,
                                 no_feasible_message, parse_ratios, parse_size, show_progress)
from service.cli.output import JSON_HELP, add_json_flag, dumps, emit, note, wants_json
from service.errors import (ConflictError, NoFeasibleMergeError, NotFoundError, RatioError,
                            SpecError)
from service.settings import get_settings
from service.spec import GroupSpec, JobSpec, SamplerName, load_spec, spec_error_from_validation


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
    add_json_flag(merge)


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
    search.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help=f"{JSON_HELP}; --json FILE writes the result to FILE instead")
    search.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda:N, or a device map such as "
                        "cuda:0,cpu (the model split over them; HMAOPT_MEMORY, HMAOPT_MAX_MEMORY)")
    search.add_argument("--trials", type=int, default=None, help="override search.n_trials")
    search.add_argument("--sampler", default=None,
                        choices=list(get_args(SamplerName)),
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
    build.add_argument("--arch", choices=("llama", "gpt2"), default="llama",
                       help="base and aligned models' family: llama (the reference world) or "
                            "gpt2 (GPT-2-style, tied embeddings; same data and reward model)")
    add_progress_flag(build)
    add_json_flag(build)


def merge_command(args: argparse.Namespace) -> int:
    """Write lerp(base, aligned, ratio_of_group) as a new Hugging Face checkpoint with
    hma_manifest.json."""
    from workers.export import export_merge  # torch-free for safetensors checkpoints

    settings = get_settings()
    spec = GroupSpec.parse_arg(args.groups, split_attn_mlp=args.split_attn_mlp,
                               non_layer=args.non_layer)
    if not args.ratios:
        raise SpecError("give at least one ratio", field="ratios")
    if Path(args.out).expanduser().exists() and not args.overwrite:
        raise ConflictError(f"--out {args.out} already exists: choose another folder, or pass "
                            "--overwrite to replace it (the old one is removed only once the "
                            "new one is complete)")
    try:
        result = export_merge(
            args.base, args.aligned, args.out, spec, args.ratios,
            allow_extrapolation=args.allow_extrapolation,
            max_shard_bytes=args.max_shard_size or settings.max_shard_bytes,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle or settings.allow_pickle,
            overwrite=args.overwrite,
            progress=show_progress(args),
        )
    except RatioError as exc:
        if "outside [" not in str(exc) or args.allow_extrapolation:
            raise
        hint = "pass --allow-extrapolation to go beyond"
        message = str(exc).removeprefix("ratios: ").replace(
            "allow extrapolation explicitly to go beyond", hint)
        raise RatioError(message if hint in message else f"{message}; {hint}",
                         field="ratios") from exc
    ratios = result.manifest["ratios"]
    emit(args, {"out": str(result.out), "groups": spec.describe(), "ratios": ratios,
                "shards": len(result.shards), "bytes": result.bytes_written,
                "seconds": result.seconds, "manifest": result.manifest},
         f"merged ({spec.describe()}; ratio = weight on the aligned model): "
         + ", ".join(f"{k}={v:g}" for k, v in ratios.items())
         + f"\nwrote {result.out} ({len(result.shards)} shard(s), "
         f"{result.bytes_written / 1e6:.1f} MB, {result.seconds:.1f} s)")
    return 0


def search_command(args: argparse.Namespace) -> int:
    """Search per-group ratios that maximise the reward with tax <= budget, the
    vanilla-averaging baseline included. --json prints the result as JSON (the summary goes
    to stderr); --json FILE writes it there. Exit code 0 when a feasible merge was found, 10
    when none was; errors exit with their group's code (2 invalid spec, 3 not found, 4
    conflict, 7 checkpoint, 9 evaluation: the README's table)."""
    spec = load_spec(args.spec)
    if args.json not in (None, "-"):  # fail now, not after the search
        folder = Path(args.json).resolve().parent
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
    if args.json == "-":
        print(json.dumps(payload, indent=2, allow_nan=False))
        note(text)
    else:
        print(text)
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False)
                                           + "\n")
            except OSError as exc:
                raise ConflictError(f"cannot write --json {args.json}: {exc}") from exc
    if args.storage is None:
        note("note: the study was kept in memory only; pass --storage sqlite:///FILE.db to "
             "keep it")
    if not result.feasible:
        raise NoFeasibleMergeError(no_feasible_message(f"search {spec.name!r}",
                                                       spec.tax.budget))
    return 0


def world_build_command(args: argparse.Namespace) -> int:
    """Train a small base LM with three skills, an aligned model that forgets them, a style
    reward model, eval sets and a ready job spec (DIR/spec.yaml)."""
    from workers.world import WorldConfig, build_world, load_world_info

    arch = getattr(args, "arch", "llama")  # the demo calls this without --arch
    label = "the reference world" if arch == "llama" else f"the {arch} world"
    if args.reuse and (info := load_world_info(args.dir, arch)) is not None:
        emit(args, {"dir": str(args.dir), "reused": True, **info},
             f"reusing {label} in {args.dir} (built in {info['seconds']:.0f} s)")
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
        info = build_world(args.dir, WorldConfig(seed=args.seed, arch=arch),
                           overwrite=args.overwrite or args.reuse, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if wants_json(args):
        print(dumps({"dir": str(args.dir), "reused": False, **info}))
        return 0
    base, aligned = info["skills"]["base"], info["skills"]["aligned"]
    print(f"built {label} in {args.dir} ({info['seconds']:.0f} s)")
    print(f"  skills, base -> aligned: addition {base['addition']:.2f} -> {aligned['addition']:.2f}, "
          f"facts {base['facts']:.2f} -> {aligned['facts']:.2f}, text perplexity "
          f"{base['text']:.2f} -> {aligned['text']:.2f}")
    print(f"  style reward, base -> aligned: {info['reward']['base']:.2f} -> "
          f"{info['reward']['aligned']:.2f}")
    print(f"  job spec: {args.dir}/spec.yaml  (hmaopt search {args.dir}/spec.yaml)")
    return 0
