"""torch's ``lerp`` merge in numpy, on raw tensor bytes: the arithmetic of workers/stream.py.

The arithmetic is torch's: ``lerp`` computes ``base + w * (aligned - base)`` for ``|w| < 0.5``
and ``aligned + (w - 1) * (aligned - base)`` otherwise, in float32 with one fused
multiply-add. numpy has no fma, so the multiply-add runs in float64 (the product of two
float32 is exact there) and is rounded once to float32, then to the output dtype (bfloat16
by round-to-nearest-even, as torch). The result equals torch's bit for bit except where the
float64 sum itself rounds (its operands more than 2**29 apart in magnitude) onto a float32
tie, and where torch's scalar tail loop (the last elements of a tensor, fewer than a vector)
does not fuse: in both cases within 1 ulp. Sources F32, F16 and BF16 go through here;
:func:`supported` says which tensors can.
"""

from __future__ import annotations

import numpy as np

from service.errors import MergeError
from workers.dtypes import DTYPE_SIZES, FLOAT_DTYPES

SUB = 1 << 15  # elements per step (the step's buffers fit the L2 cache)
_NUMERIC = {"F32", "F16", "BF16"}
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
subtract, multiply, add, copyto = np.subtract, np.multiply, np.add, np.copyto


def supported(src: str, out: str) -> bool:
    """Whether a tensor stored as ``src`` and written as ``out`` can be merged here."""
    if src not in FLOAT_DTYPES:
        return src == out
    return src in _NUMERIC and out in _NUMERIC


class Scratch:
    """One compute thread's buffers, ``SUB`` elements each."""

    def __init__(self) -> None:
        self.fb = np.empty(SUB, np.float32)
        self.fa = np.empty(SUB, np.float32)
        self.d = np.empty(SUB, np.float32)
        self.d64 = np.empty(SUB, np.float64)
        self.t64 = np.empty(SUB, np.float64)
        self.u = np.empty(SUB, np.uint32)


def lerp_into(base: bytearray, aligned: bytearray, out_buf: bytearray, n: int, src: str,
              out: str, ratio: float, name: str, s: Scratch) -> memoryview:
    """Merge the first ``n`` elements (dtype ``src``) of ``base`` and ``aligned`` into
    ``out_buf`` as dtype ``out``; returns the result's bytes.

    A non-floating tensor is passed through (a view of ``base``) and must be equal in both.
    """
    if src not in FLOAT_DTYPES:
        size = DTYPE_SIZES[src]
        b = memoryview(base)[: n * size]
        if b != memoryview(aligned)[: n * size]:
            raise MergeError(f"non-floating tensor {name} differs between base and aligned")
        return b
    b = np.frombuffer(base, _NP[src], n)
    a = np.frombuffer(aligned, _NP[src], n)
    res = np.frombuffer(out_buf, _NP[out], n)
    w = np.float32(ratio)
    small = abs(w) < np.float32(0.5)
    coef = np.float64(w if small else w - np.float32(1))
    with np.errstate(all="ignore"):
        for i in range(0, n, SUB):
            k = min(SUB, n - i)
            if k == SUB:  # the scratch arrays whole: no slicing per step
                fb, fa, d, d64, t64, u = s.fb, s.fa, s.d, s.d64, s.t64, s.u
            else:
                fb, fa, d, d64, t64, u = (s.fb[:k], s.fa[:k], s.d[:k], s.d64[:k], s.t64[:k],
                                          s.u[:k])
            fb, fa = _as_f32(b[i:i + k], src, fb), _as_f32(a[i:i + k], src, fa)
            subtract(fa, fb, out=d)  # torch: end - start, in float32
            copyto(d64, d)
            multiply(d64, coef, out=d64)  # exact: float32 x float32 fits float64
            copyto(t64, fb if small else fa)
            add(d64, t64, out=d64)
            copyto(d, d64, casting="same_kind")  # the fma's one rounding to float32
            _store(d, res[i:i + k], out, u)
    return memoryview(out_buf)[: n * DTYPE_SIZES[out]]


def _as_f32(x: np.ndarray, src: str, buf: np.ndarray) -> np.ndarray:
    if src == "F32":
        return x
    if src == "BF16":  # bfloat16 is the upper half of a float32
        np.left_shift(x, 16, out=buf.view(np.uint32), dtype=np.uint32)
        return buf
    np.copyto(buf, x)  # F16 -> F32 is exact
    return buf


def _store(r: np.ndarray, dest: np.ndarray, out: str, u: np.ndarray) -> None:
    if out == "F32":
        np.copyto(dest, r)
    elif out == "F16":
        np.copyto(dest, r, casting="same_kind")  # round to nearest even, as torch
    else:  # BF16: round to nearest even (torch's c10::BFloat16), NaN -> 0x7FC0
        bits = r.view(np.uint32)
        np.right_shift(bits, 16, out=u)
        np.bitwise_and(u, 1, out=u)
        np.add(u, 0x7FFF, out=u)
        np.add(u, bits, out=u)
        np.right_shift(u, 16, out=dest, casting="unsafe")
        nan = np.isnan(r)
        if nan.any():
            dest[nan] = 0x7FC0
