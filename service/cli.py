"""The ``hmaopt`` command line. Exit codes come from the error tree (service/errors.py).

Data-plane commands (merge, ...) import ``workers`` lazily, inside their handler, so that
control-plane commands start without torch.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from service._version import __version__
from service.errors import HmaoptError, SpecError
from service.settings import get_settings

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000 bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 512MiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def parse_ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"ratios must be comma-separated numbers, got {text!r}") from exc


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors exit 2, like SpecError
        self.print_usage(sys.stderr)
        self.exit(2, f"hmaopt: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hmaopt", description=(
        "Heterogeneous Model Averaging ratio optimizer. A ratio is the weight on the ALIGNED "
        "model: merged = base + ratio * (aligned - base); 0 = base, 1 = aligned."))
    parser.add_argument("--version", action="version", version=f"hmaopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    merge = sub.add_parser("merge", help="merge two checkpoints with per-group ratios",
                           description="Write lerp(base, aligned, ratio_of_group) as a new "
                           "Hugging Face checkpoint with hma_manifest.json.")
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
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    merge.set_defaults(handler=_cmd_merge)
    return parser


def _cmd_merge(args: argparse.Namespace) -> int:
    from service.spec import GroupSpec
    from workers.device import parse_dtype
    from workers.export import export_merge

    settings = get_settings()
    spec = GroupSpec.parse_arg(args.groups, split_attn_mlp=args.split_attn_mlp,
                               non_layer=args.non_layer)
    if not args.ratios:
        raise SpecError("give at least one ratio", field="ratios")
    result = export_merge(
        args.base, args.aligned, args.out, spec, args.ratios,
        allow_extrapolation=args.allow_extrapolation,
        max_shard_bytes=args.max_shard_size or settings.max_shard_bytes,
        dtype=parse_dtype(args.dtype),
        allow_pickle=args.allow_pickle or settings.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    ratios = result.manifest["ratios"]
    print(f"merged ({spec.describe()}; ratio = weight on the aligned model): "
          + ", ".join(f"{k}={v:g}" for k, v in ratios.items()))
    print(f"wrote {result.out} ({len(result.shards)} shard(s), {result.bytes_written / 1e6:.1f} MB, "
          f"{result.seconds:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except HmaoptError as exc:
        print(f"hmaopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hmaopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
