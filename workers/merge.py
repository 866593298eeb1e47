"""The merge: ``merged = torch.lerp(base, aligned, ratio)``, per tensor, by group ratio.

:func:`lerp_merge` is the one implementation of the formula. :class:`LiveMerger` keeps the
base and aligned weights resident once on the device and, for each new ratio vector, writes
the merge into a live model's parameters in place: no allocation per trial, no disk.
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

    Memory: the live model plus one copy each of the base and aligned weights (3x the model),
    all on ``device``. :meth:`apply` allocates nothing.
    """

    def __init__(self, model: torch.nn.Module, aligned_state: dict[str, torch.Tensor],
                 grouping: Grouping) -> None:
        self.model = model
        self.grouping = grouping
        self.entries: list[_Entry] = []
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
            self.entries.append(_Entry(
                name, live, live.detach().clone(),
                # always a private copy: on CPU transformers memory-maps the checkpoint, and
                # a file rewritten in place must not change (or SIGBUS) a running search
                aligned.detach().to(device=live.device, dtype=live.dtype, copy=True),
            ))
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
    ) -> LiveMerger:
        """Load the base model as the live model on ``device`` and the aligned weights beside it."""
        from transformers import AutoModelForCausalLM

        base_ckpt = Checkpoint.open(base_model, allow_pickle=allow_pickle)
        aligned_ckpt = Checkpoint.open(aligned_model, allow_pickle=allow_pickle)
        check_compatible(base_ckpt, aligned_ckpt)
        dev = pick_device(device)
        kwargs = dict(dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                      use_safetensors=base_ckpt.format == "safetensors")
        live = AutoModelForCausalLM.from_pretrained(base_model, **kwargs).to(dev).eval()
        aligned = AutoModelForCausalLM.from_pretrained(aligned_model, **kwargs)
        aligned_state = dict(_unique_tensors(aligned))
        names = [n for n, _ in _unique_tensors(live)]
        grouping = build_grouping(base_ckpt.config, names, spec)
        merger = cls(live, aligned_state, grouping)
        del aligned, aligned_state
        log.info("live merger on %s: %d tensors, %d ratio slot(s) %s", dev, len(merger.entries),
                 grouping.n_ratios, ", ".join(grouping.slots))
        return merger

    @torch.no_grad()
    def apply(self, ratios: Sequence[float], *, allow_extrapolation: bool = False) -> None:
        """Write ``lerp(base, aligned, ratio_of_group)`` into every live tensor."""
        checked = self.grouping.check_ratios(ratios, allow_extrapolation=allow_extrapolation)
        for e in self.entries:
            lerp_merge(e.base, e.aligned, self.grouping.ratio_of(e.name, checked), out=e.live)
        self.ratios = checked

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the merged tensors."""
        return sum(e.live.numel() * e.live.element_size() for e in self.entries)


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
