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

SUB = 1 << 16  # elements per step (the step's buffers, 16 bytes an element, stay in cache)
_NUMERIC = {"F32", "F16", "BF16"}
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
subtract, multiply, add, copyto = np.subtract, np.multiply, np.add, np.copyto
right_shift, bitwise_and = np.right_shift, np.bitwise_and


def supported(src: str, out: str) -> bool:
    """Whether a tensor stored as ``src`` and written as ``out`` can be merged here."""
    if src not in FLOAT_DTYPES:
        return src == out
    return src in _NUMERIC and out in _NUMERIC


class Scratch:
    """One compute thread's buffers, ``SUB`` elements each: two float32 (the operands, then the
    difference and the rounding's bits) and one float64 (the multiply-add)."""

    def __init__(self) -> None:
        self.x = np.empty(SUB, np.float32)
        self.y = np.empty(SUB, np.float32)
        self.p = np.empty(SUB, np.float64)


def lerp_into(base: bytearray, aligned: bytearray, out_buf: bytearray, n: int, src: str,
              out: str, ratio: float, name: str, s: Scratch) -> memoryview:
    """Merge the first ``n`` elements (dtype ``src``) of ``base`` and ``aligned`` into
    ``out_buf`` as dtype ``out``; returns the result's bytes.

    A non-floating tensor is passed through (a view of ``base``) and must be equal in both.
    Per step: two conversions to float32 (none for F32), the difference, the multiply-add in
    float64 (to float64, multiply, add, back to float32) and the store (six integer passes
    and a NaN check for BF16), in place in the scratch buffers.
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
            x, y, p = (s.x, s.y, s.p) if k == SUB else (s.x[:k], s.y[:k], s.p[:k])
            fb, fa = _as_f32(b[i:i + k], src, x), _as_f32(a[i:i + k], src, y)
            # the difference goes over the operand the multiply-add does not need
            start, d, spare = (fb, y, x) if small else (fa, x, y)
            subtract(fa, fb, out=d)  # torch: end - start, in float32
            copyto(p, d)
            multiply(p, coef, out=p)  # exact: float32 x float32 fits float64
            add(p, start, out=p)
            copyto(d, p, casting="same_kind")  # the fma's one rounding to float32
            _store(d, res[i:i + k], out, spare.view(np.uint32))
    return memoryview(out_buf)[: n * DTYPE_SIZES[out]]


def _as_f32(x: np.ndarray, src: str, buf: np.ndarray) -> np.ndarray:
    if src == "F32":
        return x
    if src == "BF16":  # bfloat16 is the upper half of a float32
        bits = buf.view(np.uint32)
        copyto(bits, x)  # widen, then shift in place: cheaper than a widening shift
        np.left_shift(bits, 16, out=bits)
        return buf
    copyto(buf, x)  # F16 -> F32 is exact
    return buf


def _store(r: np.ndarray, dest: np.ndarray, out: str, u: np.ndarray) -> None:
    """Write float32 ``r`` to ``dest`` as ``out``; ``u`` is scratch (it may be overwritten,
    and must not overlap ``r``)."""
    if out == "F32":
        copyto(dest, r)
    elif out == "F16":
        copyto(dest, r, casting="same_kind")  # round to nearest even, as torch
    else:  # BF16: round to nearest even (torch's c10::BFloat16), NaN -> 0x7FC0
        bits = r.view(np.uint32)
        right_shift(bits, 16, out=u)
        bitwise_and(u, 1, out=u)
        add(u, 0x7FFF, out=u)
        add(u, bits, out=u)
        right_shift(u, 16, out=u)
        copyto(dest, u, casting="unsafe")  # the upper halves: narrowing is cheaper than a shift to uint16
        if np.isnan(np.maximum.reduce(r)):  # one pass; maximum propagates NaN
            dest[np.isnan(r)] = 0x7FC0
