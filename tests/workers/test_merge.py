from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.errors import CheckpointMismatchError, RatioError
from service.spec import GroupSpec
from tests.models import make_tiny
from workers.merge import LiveMerger, lerp_merge

BLOCKS2 = GroupSpec(scheme="blocks", k=2)


def _expected_ratio(name: str, ratios: tuple[float, float]) -> float:
    """Hand rule for blocks:2 on 4 layers: layers 0-1 -> r0, 2-3 -> r1; embeddings r0, rest r1."""
    for layer in range(4):
        if f".layers.{layer}." in name:
            return ratios[0] if layer < 2 else ratios[1]
    return ratios[0] if "embed_tokens" in name else ratios[1]


def _state(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_lerp_merge_endpoints_are_exact():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        b, a = torch.randn(100).to(dtype), torch.randn(100).to(dtype)
        assert torch.equal(lerp_merge(b, a, 0.0), b)
        assert torch.equal(lerp_merge(b, a, 1.0), a)
        out = torch.empty_like(b)
        lerp_merge(b, a, 1.0, out=out)
        assert torch.equal(out, a)
        mid = lerp_merge(b, a, 0.3)
        assert mid.dtype == dtype
        ref = (b.double() + 0.3 * (a.double() - b.double())).to(dtype)
        assert torch.allclose(mid.double(), ref.double(), atol=0, rtol=1e-2 if dtype != torch.float32 else 1e-6)


def test_live_merge_matches_reference_and_allocates_nothing(llama_pair):
    base, aligned = llama_pair
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    base_sd, aligned_sd = _state(base), _state(aligned)
    ptrs = {n: p.data_ptr() for n, p in merger.model.named_parameters()}
    for ratios in [(0.2, 0.7), (0.9, 0.1), (0.5, 0.5)]:
        merger.apply(ratios)
        live = merger.model.state_dict()
        for name, b in base_sd.items():
            r = _expected_ratio(name, ratios)
            ref = (b.double() + r * (aligned_sd[name].double() - b.double())).float()
            assert torch.allclose(live[name], ref, atol=1e-6, rtol=1e-6), name
    assert {n: p.data_ptr() for n, p in merger.model.named_parameters()} == ptrs


def test_live_merge_endpoints_bit_for_bit(llama_pair):
    base, aligned = llama_pair
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    for ratios, ref in (((0.0, 0.0), _state(base)), ((1.0, 1.0), _state(aligned))):
        merger.apply(ratios)
        live = merger.model.state_dict()
        assert all(torch.equal(live[n], t) for n, t in ref.items())


def test_tied_embedding_merged_once(gemma_pair):
    base, aligned = gemma_pair
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    model = merger.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    names = [e.name for e in merger.entries]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    merger.apply((0.25, 0.75))
    b = _state(base)["model.embed_tokens.weight"]
    a = _state(aligned)["model.embed_tokens.weight"]
    # merged once with the first group's ratio; merging twice would give lerp(lerp(...)) instead
    assert torch.equal(model.lm_head.weight, torch.lerp(b, a, 0.25))


def test_bfloat16_live_merge(tmp_path):
    base = make_tiny(tmp_path / "b", "mistral", seed=0, dtype=torch.bfloat16)
    aligned = make_tiny(tmp_path / "a", "mistral", seed=1, dtype=torch.bfloat16)
    merger = LiveMerger.load(base, aligned, GroupSpec(scheme="uniform"), device="cpu")
    assert all(e.live.dtype == torch.bfloat16 for e in merger.entries)
    merger.apply((0.5,))
    b, a = _state(base), _state(aligned)
    live = merger.model.state_dict()
    for n in b:
        ref = torch.lerp(b[n].float(), a[n].float(), 0.5).to(torch.bfloat16)
        assert torch.equal(live[n], ref), n


def test_bad_ratios_and_mismatch(tmp_path, llama_pair):
    base, aligned = llama_pair
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    with pytest.raises(RatioError, match="takes 2 ratio"):
        merger.apply((0.5,))
    with pytest.raises(RatioError, match="outside"):
        merger.apply((0.5, 1.2))
    merger.apply((0.5, 1.2), allow_extrapolation=True)
    other = make_tiny(tmp_path / "other", "llama", num_hidden_layers=2, tie_word_embeddings=False)
    with pytest.raises(CheckpointMismatchError):
        LiveMerger.load(base, other, BLOCKS2, device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_live_merge_on_cuda(llama_pair):
    base, aligned = llama_pair
    merger = LiveMerger.load(base, aligned, BLOCKS2, device="cuda")
    merger.apply((0.3, 0.6))
    cpu = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    cpu.apply((0.3, 0.6))
    for e_gpu, e_cpu in zip(merger.entries, cpu.entries):
        assert e_gpu.live.is_cuda
        assert torch.allclose(e_gpu.live.cpu(), e_cpu.live, atol=1e-6)
