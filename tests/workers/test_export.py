from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.errors import CheckpointMismatchError, ConflictError, RatioError
from service.spec import GroupSpec
from tests.models import make_tiny, read_folder as _tensors
from workers.export import MANIFEST, export_merge
from workers.merge import LiveMerger
from tests.workers.test_merge import BLOCKS2, _expected_ratio


def test_every_tensor_matches_reference(tmp_path, llama_pair):
    base, aligned = llama_pair
    ratios = (0.3, 0.8)
    res = export_merge(base, aligned, tmp_path / "out", BLOCKS2, ratios)
    merged, b, a = _tensors(res.out), _tensors(base), _tensors(aligned)
    assert set(merged) == set(b)
    for name, t in merged.items():
        r = _expected_ratio(name, ratios)
        ref = (b[name].double() + r * (a[name].double() - b[name].double())).float()
        assert t.dtype == torch.float32
        assert torch.allclose(t, ref, atol=1e-6, rtol=1e-6), name


def test_exported_model_logits_equal_in_memory_merge(tmp_path, llama_pair):
    base, aligned = llama_pair
    ratios = (0.35, 0.65)
    out = export_merge(base, aligned, tmp_path / "out", BLOCKS2, ratios).out
    assert {"config.json", "generation_config.json", MANIFEST} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    merger.apply(ratios)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, merger.model(ids).logits)


@pytest.mark.parametrize("ratio,which", [(0.0, 0), (1.0, 1)])
def test_endpoints_reproduce_inputs_bit_for_bit(tmp_path, gemma_pair, ratio, which):
    out = export_merge(*gemma_pair, tmp_path / "out", BLOCKS2, (ratio, ratio)).out
    merged, ref = _tensors(out), _tensors(gemma_pair[which])
    assert set(merged) == set(ref)  # tied: one embedding tensor, no lm_head
    assert all(torch.equal(merged[n], t) for n, t in ref.items())


def test_sharded_in_and_out(tmp_path):
    base = make_tiny(tmp_path / "b", "gpt_neox", seed=0, max_shard_size="20KB")
    aligned = make_tiny(tmp_path / "a", "gpt_neox", seed=1, max_shard_size="20KB")
    res = export_merge(base, aligned, tmp_path / "out", GroupSpec(scheme="layers"),
                       (0.1, 0.4, 0.6, 0.9), max_shard_bytes=16_000)
    assert len(res.shards) > 2 and res.shards[0] == f"model-00001-of-{len(res.shards):05d}.safetensors"
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(res.shards)
    sizes = [(res.out / s).stat().st_size for s in res.shards]
    assert max(sizes) < 16_000 + 4_000  # limit plus header
    merged = AutoModelForCausalLM.from_pretrained(res.out)
    b, a = _tensors(base), _tensors(aligned)
    layer_ratio = {f"gpt_neox.layers.{i}.": r for i, r in enumerate((0.1, 0.4, 0.6, 0.9))}
    live = merged.state_dict()
    for name, t in b.items():
        r = next((v for k, v in layer_ratio.items() if name.startswith(k)),
                 0.1 if "embed_in" in name else 0.9)
        loaded = live["lm_head.weight" if name == "embed_out.weight" else name]
        assert torch.allclose(loaded, torch.lerp(t, a[name], r), atol=1e-6), name


def test_manifest_records_the_merge(tmp_path, llama_pair):
    base, aligned = llama_pair
    spec = GroupSpec(scheme="blocks", k=2, split_attn_mlp=True, non_layer="own")
    res = export_merge(base, aligned, tmp_path / "out", spec, (0.1, 0.2, 0.3, 0.4, 0.9))
    m = json.loads((res.out / MANIFEST).read_text())
    from service import __version__

    assert m["hmaopt_version"] == __version__
    assert m["scheme"] == "blocks" and m["non_layer_rule"] == "own"
    assert m["ratios"] == {"block0.attn": 0.1, "block0.mlp": 0.2, "block1.attn": 0.3,
                           "block1.mlp": 0.4, "non_layer": 0.9}
    assert m["groups"] == [{"name": "block0", "layers": [0, 1]}, {"name": "block1", "layers": [2, 3]}]
    assert set(m["non_layer_tensors"].values()) == {0.9}
    sha = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert m["source_sha256"]["base"] == {"model.safetensors": sha}
    assert "weight on the aligned" in m["ratio_convention"]


def test_dtype_conversion(tmp_path, llama_pair):
    res = export_merge(*llama_pair, tmp_path / "out", BLOCKS2, (0.5, 0.5), dtype=torch.bfloat16)
    assert {t.dtype for t in _tensors(res.out).values()} == {torch.bfloat16}
    assert json.loads((res.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(res.out).dtype == torch.bfloat16


def test_atomic_and_refuses_to_clobber(tmp_path, llama_pair):
    out = tmp_path / "out"
    export_merge(*llama_pair, out, BLOCKS2, (0.5, 0.5))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConflictError, match="already exists"):
        export_merge(*llama_pair, out, BLOCKS2, (0.1, 0.1))
    with pytest.raises(RatioError):
        export_merge(*llama_pair, out, BLOCKS2, (0.1, 2.0), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    export_merge(*llama_pair, out, BLOCKS2, (0.1, 0.1), overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_failure_midway_leaves_nothing(tmp_path, llama_pair, monkeypatch):
    import workers.export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the shards are written, then copying the side files fails
    monkeypatch.setattr(workers.export, "_copy_side_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_merge(*llama_pair, tmp_path / "out", BLOCKS2, (0.5, 0.5))
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder
    with pytest.raises(CheckpointMismatchError):
        export_merge(llama_pair[0], make_tiny(tmp_path / "gpt2", "gpt2"), tmp_path / "out",
                     BLOCKS2, (0.5, 0.5))
    assert not (tmp_path / "out").exists()


def test_export_memory_is_bounded_by_tensors_in_flight(tmp_path):
    """A model ~8x one shard exports with peak RSS growth far below the model size."""
    kwargs = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=2048,
                  tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)
    base = make_tiny(tmp_path / "b", "llama", seed=0, **kwargs)
    aligned = make_tiny(tmp_path / "a", "llama", seed=1, **kwargs)
    model_bytes = (base / "model.safetensors").stat().st_size
    shard = 4 * 1024 * 1024
    assert model_bytes > 6 * shard
    script = textwrap.dedent(f"""
        import json, resource, torch
        from service.spec import GroupSpec
        from workers.export import export_merge
        from workers.checkpoint import Checkpoint
        largest = max(i.nbytes for i in Checkpoint.open({str(base)!r}).tensors.values())
        torch.lerp(torch.zeros(4), torch.ones(4), 0.5)  # warm up torch's allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        export_merge({str(base)!r}, {str(aligned)!r}, {str(tmp_path / 'out')!r},
                     GroupSpec(scheme="blocks", k=3), (0.2, 0.5, 0.8), max_shard_bytes={shard})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"growth": after - before, "largest": largest}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    # in flight: base + aligned + two float32 copies + result of the largest tensor
    bound = shard + 6 * stats["largest"] + 16 * 1024 * 1024
    assert stats["growth"] < bound, stats
    assert stats["growth"] < model_bytes / 2, stats
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 6


def test_manifest_hashes_equal_an_independent_sha256(tmp_path):
    """Hashed while streamed: the manifest's sha256 of every source shard is the file's own."""
    base = make_tiny(tmp_path / "b", "llama", seed=0, max_shard_size="30KB", dtype=torch.bfloat16)
    aligned = make_tiny(tmp_path / "a", "llama", seed=1, max_shard_size="30KB", dtype=torch.bfloat16)
    res = export_merge(base, aligned, tmp_path / "out", BLOCKS2, (0.3, 0.7))
    manifest = json.loads((res.out / MANIFEST).read_text())
    for which, folder in (("base", base), ("aligned", aligned)):
        files = sorted(folder.glob("*.safetensors"))
        assert len(files) > 1
        assert manifest["source_sha256"][which] == {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_cli_merge_of_safetensors_imports_no_torch(tmp_path, llama_pair):
    script = textwrap.dedent(f"""
        import sys
        from service.cli import main
        code = main(["merge", "--base", {str(llama_pair[0])!r}, "--aligned", {str(llama_pair[1])!r},
                     "--groups", "blocks:2", "--ratios", "0.2,0.6", "--dtype", "bfloat16",
                     "--out", {str(tmp_path / 'out')!r}])
        assert code == 0 and "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert {t.dtype for t in _tensors(tmp_path / "out").values()} == {torch.bfloat16}
