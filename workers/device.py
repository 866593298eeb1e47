"""Device choice: CUDA when present, else CPU. CUDA is never initialised at import."""

from __future__ import annotations

import torch

from service.errors import SpecError


def pick_device(requested: str | None = "auto") -> torch.device:
    """``auto`` (or None) picks ``cuda`` when available, else ``cpu``; anything else is checked."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise SpecError(f"unknown device {requested!r}", field="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("CUDA was asked for but no CUDA device is available", field="device")
    return device


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``None``/``auto`` keeps the checkpoint's dtype; else float32, bfloat16, float16, float64."""
    if name in (None, "auto"):
        return None
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
        "float64": torch.float64,
    }
    if name not in table:
        raise SpecError(f"unknown dtype {name!r}; use auto, float32, bfloat16, float16 or float64",
                        field="dtype")
    return table[name]
