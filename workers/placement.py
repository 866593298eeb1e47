"""Where a live merge keeps its weights: the memory mode and the device map.

Memory modes of :class:`workers.merge.LiveMerger` (the worker setting ``HMAOPT_MEMORY``,
``hmaopt worker|search --memory``):

- ``device``: the live model, base and aligned all on the model's device (3 copies there);
  a merge reads two copies and writes one, all in device memory.
- ``host``: base and aligned stay in host memory (pinned when CUDA is used); each merge
  streams them to the device tensor by tensor through one staging buffer (one model's worth
  on the device plus the largest tensor, two models' bytes over the bus per merge).
- ``auto``: ``device`` when the two extra copies fit the device's free memory with
  :data:`RESERVE_FRACTION` of its total (at least :data:`RESERVE_BYTES`) left for the reward
  model, activations and the KV cache; else ``host``. On CPU (one memory) it is ``device``.

Every mode computes the same ``torch.lerp`` on the same device in the same dtype, so the
merged weights are the same bit for bit.

Device maps: a worker device such as ``cuda:0,cpu`` splits the live model over the listed
devices, layer-contiguous, in the order given (:func:`plan_device_map`), through
transformers' ``device_map`` (accelerate's hooks move activations between devices); each
tensor is merged where it lives. ``HMAOPT_MAX_MEMORY`` (``cuda:0=20GiB,cpu=64GiB``) caps
what each device takes; without it the free memory of each device is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from service.errors import SpecError

MEMORY_MODES = ("auto", "device", "host")
#: share of a GPU's total memory that ``auto`` leaves free beside the live model
RESERVE_FRACTION = 0.15
#: the least ``auto`` leaves free, in bytes
RESERVE_BYTES = 2 * 2**30

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_devices(requested: str | None) -> list[str]:
    """``"cuda:0,cpu"`` -> ``["cuda:0", "cpu"]``; one device -> a list of one."""
    names = [d.strip() for d in (requested or "auto").split(",") if d.strip()]
    if not names:
        raise SpecError("no device given", field="device")
    if len(names) > 1 and "auto" in names:
        raise SpecError("a device map lists devices (cuda:0,cpu), not auto", field="device")
    return names


def parse_bytes(text: str, *, field: str = "max_memory") -> int:
    """``"20GiB"``, ``"512MB"``, ``"1000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise SpecError(f"not a size: {text!r} (use e.g. 20GiB or 512MB)", field=field)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(text: str | None) -> dict[str, int]:
    """``"cuda:0=20GiB,cpu=64GiB"`` -> ``{"cuda:0": ..., "cpu": ...}``."""
    caps: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        device, eq, size = part.partition("=")
        if not eq:
            raise SpecError(f"max_memory entries are DEVICE=SIZE, got {part!r}",
                            field="max_memory")
        caps[device.strip()] = parse_bytes(size, field="max_memory")
    return caps


def free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a device; CPU: the available and total RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


def choose_memory(mode: str, extra_bytes: int, device: torch.device) -> str:
    """The mode to use: ``auto`` resolved against ``device``'s free memory.

    ``extra_bytes`` is what ``device`` mode adds beside the live model (base + aligned).
    """
    if mode not in MEMORY_MODES:
        raise SpecError(f"unknown memory mode {mode!r}; use {', '.join(MEMORY_MODES)}",
                        field="memory")
    if mode != "auto":
        return mode
    if device.type == "cpu":
        return "device"
    free, total = free_bytes(device)
    reserve = max(RESERVE_BYTES, int(RESERVE_FRACTION * total))
    return "device" if extra_bytes <= free - reserve else "host"


def _blocks(model: torch.nn.Module, no_split: set[str]) -> list[str]:
    """Module names in registration (forward) order, not descending into ``no_split`` classes
    or modules without children; modules with direct parameters of their own are kept whole."""
    out: list[str] = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        children = list(module.named_children())
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if type(module).__name__ in no_split or not children or own:
            out.append(prefix)
            return
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def plan_device_map(model: torch.nn.Module, devices: Sequence[str],
                    capacity: dict[str, int]) -> dict[str, str]:
    """A layer-contiguous ``device_map`` for ``model`` (built on the meta device is fine).

    Blocks are given to ``devices`` in order, each taking blocks while their bytes fit its
    ``capacity``; the last device takes the rest only if it fits, else an error says how much
    is missing. Tied modules (an output head sharing the input embedding) go with the module
    they share storage with.
    """
    from accelerate.utils import compute_module_sizes

    no_split = set(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model)
    blocks = _blocks(model, no_split)
    owner: dict[int, str] = {}  # storage -> the first block that holds it
    tied: dict[str, str] = {}
    for block in blocks:
        module = model.get_submodule(block) if block else model
        for p in module.parameters():
            key = id(p)
            if key in owner and owner[key] != block:
                tied[block] = owner[key]
            owner.setdefault(key, block)
    plan: dict[str, str] = {}
    order = list(devices)
    i, used = 0, 0
    for block in blocks:
        if block in tied:
            continue
        need = sizes.get(block, 0)
        while used + need > capacity.get(order[i], 0) and i + 1 < len(order):
            i, used = i + 1, 0
        if used + need > capacity.get(order[i], 0):
            total = sum(sizes.get(b, 0) for b in blocks if b not in tied)
            raise SpecError(
                f"the model ({_size(total)}) does not fit the devices {', '.join(order)} "
                "(capacities " + ", ".join(f"{d}={_size(capacity.get(d, 0))}" for d in order)
                + "); add a device or raise HMAOPT_MAX_MEMORY", field="device")
        plan[block] = order[i]
        used += need
    for block, other in tied.items():
        plan[block] = plan[other]
    return plan


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def device_capacity(devices: Sequence[str], caps: dict[str, int]) -> dict[str, int]:
    """Bytes each listed device may take: its ``HMAOPT_MAX_MEMORY`` cap, else its free memory
    less the reserve (a device listed twice shares its memory evenly)."""
    out: dict[str, int] = {}
    for name in devices:
        if name in caps:
            out[name] = caps[name]
            continue
        free, total = free_bytes(torch.device(name))
        reserve = max(RESERVE_BYTES, int(RESERVE_FRACTION * total)) if name != "cpu" else 0
        out[name] = max(0, free - reserve) // devices.count(name)
    return out
