"""Tensor dtypes by their safetensors names (``BF16``, ``F32``, ...), without importing torch.

Checkpoint indexes and shard plans keep these names; :func:`torch_dtype` turns one into a
``torch.dtype`` (and imports torch) only where a tensor is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: Bytes per element of each safetensors dtype name.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
#: torch's name of each dtype (``str(torch.bfloat16)`` without ``torch.``).
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_BY_TORCH_NAME = {v: k for k, v in TORCH_NAMES.items()}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of ``dtype``: a name (``"BF16"``) or a ``torch.dtype``."""
    if isinstance(dtype, str) and dtype in DTYPE_SIZES:
        return dtype
    name = _BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
