"""The torch-free streaming merge (workers/stream.py) against torch's arithmetic."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from service.errors import MergeError
from service.spec import GroupSpec
from tests.models import read_folder
from workers import lerp_numpy, stream
from workers.export import MANIFEST, export_merge
from workers.merge import lerp_merge

UNIFORM = GroupSpec(scheme="uniform")
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}


def _random(shape, dtype, gen, *, special=False):
    t = torch.randn(shape, generator=gen) * 0.02
    if special:  # big, tiny, zeros of both signs, inf and nan
        flat = t.view(-1)
        flat[:8] = torch.tensor([3e38, -3e38, 1e-40, -0.0, 0.0, float("inf"), float("nan"), 1.0])
    return t.to(dtype)


def _checkpoint(folder, tensors, shard_names=None):
    """Save ``tensors`` (name -> tensor) as a safetensors checkpoint, sharded when asked."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if not shard_names:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    files = {}
    for name, t in tensors.items():
        files.setdefault(shard_names(name), {})[name] = t
    for fname, part in files.items():
        save_file(part, folder / fname, metadata={"format": "pt"})
    weight_map = {n: shard_names(n) for n in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _pair(tmp_path, dtype, *, special=False, sizes=(1, 7, 31, 1000, stream.CHUNK + 4097)):
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.0.w{i}" for i in range(len(sizes))]
    base = {n: _random((s,), dtype, gen, special=special and s > 8) for n, s in zip(names, sizes)}
    aligned = {n: (t.float() + _random(t.shape, torch.float32, gen)).to(dtype)
               for n, t in base.items()}
    base["model.layers.0.ids"] = aligned["model.layers.0.ids"] = torch.arange(5)
    return (_checkpoint(tmp_path / "base", base), _checkpoint(tmp_path / "aligned", aligned),
            base, aligned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0, -0.25, 1.4])
def test_bit_for_bit_torch_lerp(tmp_path, dtype, ratio):
    """Every element equals today's torch merge (lerp in float32, then the output dtype)."""
    base_dir, aligned_dir, base, aligned = _pair(tmp_path, dtype, special=True)
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [ratio],
                       allow_extrapolation=True)
    merged = read_folder(res.out)
    for name, b in base.items():
        ref = lerp_merge(b, aligned[name], ratio)
        got = merged[name]
        assert got.dtype == ref.dtype, name
        same = (got.view(-1).view(torch.uint8) == ref.view(-1).view(torch.uint8))
        both_nan = (got.isnan() & ref.isnan()) if got.is_floating_point() else False
        assert torch.equal(got, ref) or bool(((got == ref) | both_nan).all()), (name, same.sum())


@pytest.mark.parametrize("src,out", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_dtype_conversions_equal_torch(tmp_path, src, out):
    base_dir, aligned_dir, base, aligned = _pair(tmp_path, src)
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.35], dtype=out)
    merged = read_folder(res.out)
    for name, b in base.items():
        want = lerp_merge(b, aligned[name], 0.35, out_dtype=out if b.is_floating_point() else None)
        assert torch.equal(merged[name], want), name


def test_hashes_while_reading_equal_sha256_even_out_of_order(tmp_path):
    """Sharded, and the aligned checkpoint laid out in another order: hashes still exact."""
    gen = torch.Generator().manual_seed(1)
    names = [f"model.layers.0.t{i}" for i in range(6)]
    base = {n: _random((300 + i,), torch.bfloat16, gen) for i, n in enumerate(names)}
    aligned = {n: _random((300 + i,), torch.bfloat16, gen) for i, n in enumerate(names)}
    base_dir = _checkpoint(tmp_path / "base", base, lambda n: f"part{int(n[-1]) % 2}.safetensors")
    aligned_dir = _checkpoint(tmp_path / "aligned", aligned)
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.5])
    manifest = json.loads((res.out / MANIFEST).read_text())
    for which, folder in (("base", base_dir), ("aligned", aligned_dir)):
        want = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(folder.glob("*.safetensors"))}
        assert manifest["source_sha256"][which] == want


def test_a_differing_integer_tensor_fails_and_leaves_nothing(tmp_path):
    base_dir, aligned_dir, _, _ = _pair(tmp_path, torch.bfloat16)
    aligned = read_folder(aligned_dir)
    aligned["model.layers.0.ids"] = torch.arange(5) + 1
    (aligned_dir / "model.safetensors").unlink()
    save_file(aligned, aligned_dir / "model.safetensors")
    with pytest.raises(MergeError, match="differs"):
        export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "base"]


def test_float64_takes_the_torch_path(tmp_path, monkeypatch):
    base_dir, aligned_dir, base, aligned = _pair(tmp_path, torch.float64, sizes=(10, 33))
    monkeypatch.setattr(stream, "stream_merge", None)  # would fail if called
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.25])
    merged = read_folder(res.out)
    assert all(torch.equal(merged[n], lerp_merge(b, aligned[n], 0.25)) for n, b in base.items())


def test_small_slots_keep_order_and_bytes(tmp_path, monkeypatch):
    """Many chunks per tensor and few slots: the writer still puts every chunk in place."""
    base_dir, aligned_dir, base, aligned = _pair(tmp_path, torch.bfloat16)
    monkeypatch.setattr(stream, "CHUNK", 64)
    monkeypatch.setattr(lerp_numpy, "SUB", 16)
    monkeypatch.setattr(stream, "SLOTS", 2)
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.6],
                       max_shard_bytes=1500)
    assert len(res.shards) > 2
    merged = read_folder(res.out)
    assert all(torch.equal(merged[n], lerp_merge(b, aligned[n], 0.6)) for n, b in base.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ratio", [0.3, 0.7, 1 / 3])
def test_cancellation_needs_the_fused_multiply_add(tmp_path, dtype, ratio):
    """base 3 and aligned -7 (scaled) at ratio 0.3: 0.7 * 3 - 0.3 * 7 cancels to the rounding
    error of the product, -2**-23 with torch's fma but 0 with a float32 multiply then add
    (not within 1 bf16 ulp). Every element must still equal torch's, bit for bit."""
    scale = torch.tensor([2.0 ** e for e in range(-20, 21, 4)])
    pairs = [(3.0, -7.0), (-3.0, 7.0), (1.0, -2.0), (5.0, -3.0), (7.0, -3.0), (2.0, -1.0)]
    b = torch.cat([s * scale for s, _ in pairs]).to(dtype)
    a = torch.cat([t * scale for _, t in pairs]).to(dtype)
    n = lerp_numpy.SUB + 5  # a whole step and a partial one
    b, a = b.repeat(n // len(b) + 1)[:n], a.repeat(n // len(a) + 1)[:n]
    base_dir = _checkpoint(tmp_path / "base", {"model.layers.0.w": b})
    aligned_dir = _checkpoint(tmp_path / "aligned", {"model.layers.0.w": a})
    res = export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [ratio])
    got, ref = read_folder(res.out)["model.layers.0.w"], lerp_merge(b, a, ratio)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    if dtype == torch.bfloat16 and ratio == 0.3:  # the case is real: a plain multiply-add misses
        w = torch.tensor(ratio, dtype=torch.float32)
        plain = (b.float() + (w * (a.float() - b.float()))).to(dtype)
        assert not torch.equal(plain, ref)


@pytest.mark.parametrize("which", ["base", "aligned"])
def test_a_source_truncated_under_the_reader_fails_cleanly(tmp_path, monkeypatch, which):
    """Either reader's error stops the whole pipeline (no thread left waiting) and the
    export leaves nothing behind."""
    base_dir, aligned_dir, _, _ = _pair(tmp_path, torch.bfloat16)
    monkeypatch.setattr(stream, "CHUNK", 256)
    monkeypatch.setattr(stream, "SLOTS", 2)
    real = stream.stream_merge

    def truncate_then_merge(*args, **kwargs):
        victim = (base_dir if which == "base" else aligned_dir) / "model.safetensors"
        os.truncate(victim, victim.stat().st_size - 3000)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "stream_merge", truncate_then_merge)
    with pytest.raises(MergeError, match="truncated"):
        export_merge(base_dir, aligned_dir, tmp_path / "out", UNIFORM, [0.5], hash_cache=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "base"]
