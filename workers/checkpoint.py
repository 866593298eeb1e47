"""Checkpoint I/O: read Hugging Face checkpoint folders and write safetensors shards.

Reading parses the safetensors header and reads each tensor with ``readinto`` into a fresh
tensor, without memory-mapping the file, so the memory a reader holds is the tensors it
returned and nothing else (a mapped shard would count its touched pages as resident).

Writing plans the shards from the tensors' shapes and dtypes, writes each shard's header
first and then streams the tensors one at a time: peak memory is the tensors in flight,
not a shard and never the model.

Pickle checkpoints (``*.bin``, ``*.pt``) can run code when loaded; they are refused unless
the caller passes ``allow_pickle=True``.

Importing this module does not import torch: dtypes are kept by their safetensors names
(``BF16``, ``F32``, ...) and torch is imported by the functions that make tensors, so the
streaming export (workers/stream.py) runs without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import (
    CheckpointError,
    CheckpointMismatchError,
    NotFoundError,
    PickleRefusedError,
)
from service.files import read_mapping
from workers.dtypes import DTYPE_SIZES, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
#: Files copied next to the merged weights (taken from the aligned checkpoint, else the base).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)

def __getattr__(attr: str):  # DTYPES / DTYPE_NAMES, built (with torch) when first asked for
    if attr == "DTYPES":
        return {name: torch_dtype(name) for name in DTYPE_SIZES}
    if attr == "DTYPE_NAMES":
        return {torch_dtype(name): name for name in DTYPE_SIZES}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and (safetensors) byte range."""

    name: str
    file: Path
    dtype_name: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offsets in the file (safetensors only)
    end: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype_name]


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint folder: its config and an index of its tensors."""

    path: Path
    config: dict
    format: str  # "safetensors" or "pickle"
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Index the checkpoint in ``path`` (config.json plus safetensors or, if allowed, pickle)."""
        path = Path(path)
        if not path.exists():
            raise NotFoundError(f"checkpoint folder {path} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder: give the checkpoint's folder")
        config = _read_json(path / "config.json", what="model config")
        if (path / SAFE_INDEX).exists() or (path / SAFE_SINGLE).exists():
            files = _weight_files(path, SAFE_INDEX, SAFE_SINGLE)
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for info in _safetensors_header(file):
                    if info.name in tensors:
                        raise CheckpointError(f"tensor {info.name} appears in two shards of {path}")
                    tensors[info.name] = info
            _check_index_names(path / SAFE_INDEX, tensors)
            return cls(path, config, "safetensors", tensors, files)
        pickles = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob(PICKLE_INDEX))
        if pickles:
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{path} holds a pickle checkpoint ({pickles[0].name}) and no safetensors: "
                    "loading pickle can run arbitrary code, so it is refused. Convert it to "
                    "safetensors (model.save_pretrained(dir, safe_serialization=True)) or, if you "
                    "trust the file, allow pickle explicitly (--allow-pickle / "
                    "HMAOPT_ALLOW_PICKLE=1)."
                )
            files = _weight_files(path, PICKLE_INDEX, PICKLE_SINGLE)
            ckpt = cls(path, config, "pickle", {}, files)
            for file in files:
                for name, t in ckpt._load_pickle(file).items():
                    ckpt.tensors[name] = TensorInfo(name, file, dtype_name(t.dtype), tuple(t.shape))
            return ckpt
        raise NotFoundError(
            f"no weights in {path}: expected {SAFE_SINGLE} or {SAFE_INDEX} (safetensors)"
        )

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return f"{self.config.get('model_type', '?')}/{','.join(archs) or '?'}"

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor into fresh memory (no mmap) and move it to ``device``."""
        import torch

        info = self.tensors[name]
        if self.format == "pickle":
            return self._load_pickle(info.file)[name].to(device, copy=True)
        buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
        try:
            with open(info.file, "rb") as f:
                f.seek(info.begin)
                got = f.readinto(buf.numpy())
        except OSError as exc:
            raise CheckpointError(f"cannot read {name} from {info.file}: {exc}") from exc
        if got != buf.numel():
            raise CheckpointError(f"{info.file} is truncated: tensor {name} is incomplete")
        tensor = buf.view(info.dtype).reshape(info.shape) if buf.numel() else torch.empty(
            info.shape, dtype=info.dtype
        )
        return tensor.to(device) if str(device) != "cpu" else tensor

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        import torch

        if file not in self._pickle_cache:
            self._pickle_cache.clear()  # keep one file loaded at a time
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many kinds for a bad pickle
                raise CheckpointError(f"cannot load pickle checkpoint {file}: {exc}") from exc
            self._pickle_cache[file] = state
        return self._pickle_cache[file]


def check_compatible(base: Checkpoint, aligned: Checkpoint, *, max_listed: int = 5) -> None:
    """Raise CheckpointMismatchError naming the first differences between two checkpoints."""
    problems: list[str] = []
    for key in ("model_type", "architectures"):
        if base.config.get(key) != aligned.config.get(key):
            problems.append(
                f"config {key}: base {base.config.get(key)!r} vs aligned {aligned.config.get(key)!r}"
            )
    only_base = sorted(set(base.tensors) - set(aligned.tensors))
    only_aligned = sorted(set(aligned.tensors) - set(base.tensors))
    problems += [f"tensor {n} only in base" for n in only_base[:max_listed]]
    problems += [f"tensor {n} only in aligned" for n in only_aligned[:max_listed]]
    for name in sorted(set(base.tensors) & set(aligned.tensors)):
        b, a = base.tensors[name], aligned.tensors[name]
        if b.shape != a.shape:
            problems.append(f"tensor {name}: shape {list(b.shape)} vs {list(a.shape)}")
        elif b.dtype_name != a.dtype_name:
            problems.append(f"tensor {name}: dtype {b.dtype_name} vs {a.dtype_name}")
    if problems:
        more = f" (and {len(problems) - max_listed} more)" if len(problems) > max_listed else ""
        raise CheckpointMismatchError(
            f"base {base.path} and aligned {aligned.path} do not match: "
            + "; ".join(problems[:max_listed])
            + more
            + ". Both must be the same architecture, saved with the same tensors, shapes and dtypes."
        )


def sha256_file(file: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of one file, streamed in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file; keys are file names."""
    return {file.name: sha256_file(file) for file in files}


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, output dtype (a safetensors name or a torch.dtype)
    and shape."""

    name: str
    dtype: Any
    shape: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype_name]


def plan_shards(tensors: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Cut ``tensors`` (in order) into shards of at most ``max_shard_bytes`` each.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    """Hugging Face shard names: ``model.safetensors`` alone, else ``model-0000i-of-0000n``."""
    if n == 1:
        return [SAFE_SINGLE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def shard_header(plans: Sequence[TensorPlan], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's first bytes: the length, then the JSON header of ``plans``.

    The data starts 8-byte aligned, in the order of ``plans``.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for p in plans:
        header[p.name] = {
            "dtype": p.dtype_name,
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    file: Path,
    plans: Sequence[TensorPlan],
    produce: Callable[[TensorPlan], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one safetensors file: the header from ``plans``, then each produced tensor."""
    import torch

    with open(file, "wb") as f:
        f.write(shard_header(plans, metadata))
        for p in plans:
            t = produce(p)
            if dtype_name(t.dtype) != p.dtype_name or tuple(t.shape) != p.shape:
                raise CheckpointError(
                    f"internal: {p.name} produced {t.dtype} {tuple(t.shape)}, "
                    f"planned {p.dtype} {p.shape}"
                )
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
            del t, data


def write_index(folder: Path, shards: Sequence[Sequence[TensorPlan]], names: Sequence[str]) -> None:
    """Write ``model.safetensors.index.json`` (only meaningful for more than one shard)."""
    weight_map = {p.name: fname for fname, shard in zip(names, shards) for p in shard}
    total = sum(p.nbytes for shard in shards for p in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- helpers


def _read_json(file: Path, *, what: str) -> dict:
    return read_mapping(file, what=what, loads=json.loads, errors=(json.JSONDecodeError,),
                        error=CheckpointError)


def _weight_files(folder: Path, index_name: str, single_name: str) -> list[Path]:
    if (folder / index_name).exists():
        index = _read_json(folder / index_name, what="weight index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / index_name} has no weight_map")
        outside = [f for f in weight_map.values()
                   if not isinstance(f, str) or Path(f).name != f or f in (".", "..")]
        if outside:
            raise CheckpointError(f"{folder / index_name} names shards outside its folder "
                                  f"({', '.join(map(str, outside[:3]))}); shards are plain "
                                  "file names")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise NotFoundError(
                f"{folder / index_name} names shards that are missing: {', '.join(missing[:5])}"
            )
        return files
    return [folder / single_name]


def _check_index_names(index_file: Path, tensors: dict[str, TensorInfo]) -> None:
    if not index_file.exists():
        return
    weight_map = _read_json(index_file, what="weight index")["weight_map"]
    for name, fname in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != fname:
            raise CheckpointError(f"{index_file} maps {name} to {fname}, which does not hold it")


def _safetensors_header(file: Path) -> list[TensorInfo]:
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{file} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{file} is not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
        size = file.stat().st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {file}: {exc}") from exc
    start = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            if dtype not in DTYPE_SIZES:
                raise KeyError(dtype)
            b, e = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: bad header entry for tensor {name}") from exc
        info = TensorInfo(name, file, dtype, shape, start + b, start + e)
        if info.end - info.begin != info.nbytes or info.end > size:
            raise CheckpointError(f"{file}: tensor {name} has a bad byte range (file truncated?)")
        infos.append(info)
    return infos
