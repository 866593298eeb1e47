"""The merge: ``merged = torch.lerp(base, aligned, ratio)``, per tensor, by group ratio.

:func:`lerp_merge` is the one implementation of the formula. :class:`LiveMerger` keeps the
base and aligned weights resident once (on the device, or in host memory: the memory modes
of workers/placement.py) and, for each new ratio vector, writes the merge into a live
model's parameters in place: no allocation per trial, no disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import MergeError
from service.spec import GroupSpec
from workers.checkpoint import Checkpoint, check_compatible
from workers.device import pick_device
from workers.grouping import Grouping, build_grouping
from workers.placement import (choose_memory, device_capacity, parse_devices,
                               parse_max_memory, plan_device_map)

log = logging.getLogger(__name__)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a merge is computed in: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lerp_merge(
    base: torch.Tensor,
    aligned: torch.Tensor,
    ratio: float,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base + ratio * (aligned - base)``; ratio 0 gives ``base`` and 1 gives ``aligned`` exactly.

    With ``out`` the result is written into it in place (same dtype as the inputs; torch
    computes half-precision lerp in float32 internally). Without ``out`` the merge is computed
    in :func:`compute_dtype` and cast to ``out_dtype`` (default: the input dtype).
    Non-floating tensors must be equal in both models and are passed through.
    """
    if not base.is_floating_point():
        if not torch.equal(base, aligned):
            raise MergeError("a non-floating tensor differs between base and aligned")
        result = base if out is None else out.copy_(base)
        return result
    if out is not None:
        return torch.lerp(base, aligned, ratio, out=out)
    ct = compute_dtype(base.dtype)
    merged = torch.lerp(base.to(ct), aligned.to(ct), ratio)
    return merged.to(out_dtype or base.dtype)


@dataclass
class _Entry:
    name: str
    live: torch.Tensor
    base: torch.Tensor
    aligned: torch.Tensor


class LiveMerger:
    """Writes merges into a live model in place; base and aligned stay resident once.

    ``memory="device"``: the live model plus one copy each of the base and aligned weights
    (3x the model), each beside its live tensor. ``memory="host"``: base and aligned in host
    memory (pinned for CUDA), streamed to the live tensor's device through one staging buffer
    per device at each merge. :meth:`apply` allocates nothing in either mode, and both give
    the same merged weights bit for bit (the same ``torch.lerp`` on the same device).
    """

    def __init__(self, model: torch.nn.Module, aligned_state: dict[str, torch.Tensor],
                 grouping: Grouping, *, memory: str = "device") -> None:
        if memory not in ("device", "host"):
            raise MergeError(f"memory mode {memory!r}: use device or host (auto is resolved "
                             "by LiveMerger.load)")
        self.model = model
        self.grouping = grouping
        self.memory = memory
        self.entries: list[_Entry] = []
        #: host mode: one flat buffer per device and dtype, the size of its largest tensor
        self._staging: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for name, live in _unique_tensors(model):
            if name not in aligned_state:
                raise MergeError(f"the aligned model has no tensor {name}")
            aligned = aligned_state[name]
            if aligned.shape != live.shape:
                raise MergeError(f"{name}: aligned shape {list(aligned.shape)} vs base {list(live.shape)}")
            if not live.is_floating_point():
                if not torch.equal(aligned.to(live.device), live):
                    raise MergeError(f"non-floating tensor {name} differs between base and aligned")
                continue
            if name not in grouping.rules:
                raise MergeError(f"no group rule for tensor {name}")
            home = live.device if memory == "device" else torch.device("cpu")
            pin = home != live.device and live.device.type == "cuda"
            self.entries.append(_Entry(
                name, live, _resident(live.detach(), home, pin),
                # always a private copy: on CPU transformers memory-maps the checkpoint, and
                # a file rewritten in place must not change (or SIGBUS) a running search
                _resident(aligned.detach().to(dtype=live.dtype), home, pin),
            ))
        for e in self.entries if memory == "host" else ():
            key = (e.live.device, e.live.dtype)
            have = self._staging.get(key)
            if have is None or have.numel() < e.live.numel():
                self._staging[key] = torch.empty(
                    e.live.numel(), dtype=e.live.dtype, device=e.live.device)
        self.ratios: tuple[float, ...] | None = None

    @classmethod
    def load(
        cls,
        base_model: str | Path,
        aligned_model: str | Path,
        spec: GroupSpec,
        *,
        device: str | None = "auto",
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        memory: str = "auto",
        max_memory: str | None = None,
    ) -> LiveMerger:
        """Load the base model as the live model on ``device`` and the aligned weights beside it.

        ``device`` may list several devices (``cuda:0,cpu``): the live model is split over
        them, layer-contiguous (workers/placement.py). ``memory`` is a mode of
        workers/placement.py; ``max_memory`` caps the bytes per device of a device map.
        """
        from transformers import AutoModelForCausalLM

        base_ckpt = Checkpoint.open(base_model, allow_pickle=allow_pickle)
        aligned_ckpt = Checkpoint.open(aligned_model, allow_pickle=allow_pickle)
        check_compatible(base_ckpt, aligned_ckpt)
        kwargs = dict(dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                      use_safetensors=base_ckpt.format == "safetensors")
        devices = parse_devices(device)
        if len(devices) == 1:
            dev = pick_device(devices[0])
            live = AutoModelForCausalLM.from_pretrained(base_model, **kwargs).to(dev).eval()
        else:
            for d in devices:
                pick_device(d)  # checked: cuda asked for where there is none is a SpecError
            from accelerate import dispatch_model

            device_map = _device_map(base_model, devices, max_memory, kwargs)
            live = AutoModelForCausalLM.from_pretrained(base_model, **kwargs).eval()
            # accelerate's hooks move activations between the devices; forced so that a map
            # over one device (the CPU tests) runs the same path as cuda:0,cpu
            live = dispatch_model(live, device_map=device_map, force_hooks=True)
            dev = next(live.parameters()).device
        aligned = AutoModelForCausalLM.from_pretrained(aligned_model, **kwargs)
        aligned_state = dict(_unique_tensors(aligned))
        names = [n for n, _ in _unique_tensors(live)]
        grouping = build_grouping(base_ckpt.config, names, spec)
        extra = 2 * sum(t.numel() * t.element_size() for _, t in _unique_tensors(live))
        mode = "device" if memory == "auto" and len(devices) > 1 else choose_memory(
            memory, extra, dev)  # a split model: each device holds only its share
        merger = cls(live, aligned_state, grouping, memory=mode)
        del aligned, aligned_state
        log.info("live merger on %s, memory %s: %d tensors, %d ratio slot(s) %s; resident %s",
                 ",".join(devices), mode, len(merger.entries), grouping.n_ratios,
                 ", ".join(grouping.slots),
                 ", ".join(f"{d} {b / 2**20:.1f} MiB" for d, b in merger.resident_bytes().items()))
        return merger

    @torch.no_grad()
    def apply(self, ratios: Sequence[float], *, allow_extrapolation: bool = False) -> None:
        """Write ``lerp(base, aligned, ratio_of_group)`` into every live tensor."""
        checked = self.grouping.check_ratios(ratios, allow_extrapolation=allow_extrapolation)
        for e in self.entries:
            ratio = self.grouping.ratio_of(e.name, checked)
            if self.memory == "device":
                lerp_merge(e.base, e.aligned, ratio, out=e.live)
                continue
            # host mode: base into the live tensor, aligned into the staging buffer, then
            # the same elementwise lerp in place (pinned sources: asynchronous copies, in
            # order on the device's stream; on CPU the same path, as the tests run it)
            stage = self._staging[e.live.device, e.live.dtype][:e.live.numel()].view(e.live.shape)
            e.live.copy_(e.base, non_blocking=True)
            stage.copy_(e.aligned, non_blocking=True)
            torch.lerp(e.live, stage, ratio, out=e.live)
        self.ratios = checked

    def delta_dot(self, e: _Entry, grad: torch.Tensor) -> float:
        """``<grad, aligned - base>`` of one entry, on the gradient's device, in float32
        (the gradient stage's contraction; host mode moves one tensor's pair at a time)."""
        g = grad.reshape(-1).float()
        aligned = e.aligned.to(g.device, non_blocking=True).reshape(-1).float()
        base = e.base.to(g.device, non_blocking=True).reshape(-1).float()
        return float(g @ aligned - g @ base)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this merger keeps per device: live, base and aligned tensors and staging."""
        out: dict[str, int] = {}

        def add(t: torch.Tensor) -> None:
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()

        for e in self.entries:
            add(e.live)
            add(e.base)
            add(e.aligned)
        for buf in self._staging.values():
            add(buf)
        return out

    def placement(self) -> dict:
        """What the job records of where its merge lives."""
        return {"memory": self.memory, "resident_bytes": self.resident_bytes(),
                "devices": sorted({str(e.live.device) for e in self.entries})}

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the merged tensors."""
        return sum(e.live.numel() * e.live.element_size() for e in self.entries)


def _resident(t: torch.Tensor, home: torch.device, pin: bool) -> torch.Tensor:
    """A private copy of ``t`` on ``home`` (pinned host memory with ``pin``)."""
    out = t.to(device=home, copy=True)
    return out.pin_memory() if pin else out


def _device_map(model_path, devices: list[str], max_memory: str | None, kwargs: dict) -> dict:
    """The layer-contiguous device map of a model on ``devices`` (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path,
                                        trust_remote_code=kwargs["trust_remote_code"])
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None),
                                                trust_remote_code=kwargs["trust_remote_code"])
    meta.tie_weights()  # from_config on the meta device leaves tied weights apart
    return plan_device_map(meta, devices, device_capacity(devices, parse_max_memory(max_memory)))


def _unique_tensors(model: torch.nn.Module):
    """(name, tensor) for parameters and persistent buffers, each storage once (tied = one)."""
    seen: set[int] = set()
    persistent = set(model.state_dict().keys())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in persistent:
            continue
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        yield name, t.data
