"""Memory modes and device maps of the live merge (workers/placement.py, workers/merge.py).

On CPU the host mode runs its streaming path (base into the live tensor, aligned through the
staging buffer, lerp in place) and the device-map path runs through transformers'
``device_map`` with a map forced over CPU; the CUDA tests run where a GPU is present
(scripts/gpu-check.sh).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from service.errors import SpecError
from service.spec import GroupSpec
from tests.models import make_pair
from workers.merge import LiveMerger
from workers.placement import (choose_memory, parse_bytes, parse_devices, parse_max_memory,
                               plan_device_map)

BLOCKS2 = GroupSpec(scheme="blocks", k=2)
RATIOS = [(0.0, 0.0), (0.3, 0.7), (1.0, 1.0), (0.123456, 0.987654)]
PROMPT = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])


def _weights(merger: LiveMerger) -> dict[str, torch.Tensor]:
    return {e.name: e.live.detach().cpu().clone() for e in merger.entries}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_and_device_modes_merge_bit_for_bit(tmp_path, dtype):
    base, aligned = make_pair(tmp_path, dtype=dtype)
    device = LiveMerger.load(base, aligned, BLOCKS2, device="cpu", memory="device")
    host = LiveMerger.load(base, aligned, BLOCKS2, device="cpu", memory="host")
    assert (device.memory, host.memory) == ("device", "host")
    assert host._staging  # the streaming path, not the resident one
    for ratios in RATIOS:
        device.apply(ratios)
        host.apply(ratios)
        _same(_weights(device), _weights(host))
        with torch.no_grad():
            assert torch.equal(device.model(PROMPT).logits, host.model(PROMPT).logits)
    # identical generations too (greedy)
    out_d = device.model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    out_h = host.model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_d, out_h)


def test_resident_bytes_per_mode(tmp_path):
    base, aligned = make_pair(tmp_path)
    device = LiveMerger.load(base, aligned, BLOCKS2, device="cpu", memory="device")
    host = LiveMerger.load(base, aligned, BLOCKS2, device="cpu", memory="host")
    one = device.nbytes
    assert device.resident_bytes() == {"cpu": 3 * one}
    largest = max(e.live.numel() * e.live.element_size() for e in host.entries)
    assert host.resident_bytes() == {"cpu": 3 * one + largest}
    placement = host.placement()
    assert placement["memory"] == "host" and placement["devices"] == ["cpu"]


def test_auto_is_device_on_cpu_and_modes_are_checked(tmp_path):
    assert choose_memory("auto", 10**15, torch.device("cpu")) == "device"
    assert choose_memory("host", 0, torch.device("cpu")) == "host"
    with pytest.raises(SpecError) as err:
        choose_memory("gpu", 0, torch.device("cpu"))
    assert err.value.field == "memory"
    base, aligned = make_pair(tmp_path)
    assert LiveMerger.load(base, aligned, BLOCKS2, device="cpu").memory == "device"


def test_gradient_contraction_is_the_same_in_host_mode(tmp_path):
    from workers.gradient import RatioGradient

    base, aligned = make_pair(tmp_path)
    grads = []
    for memory in ("device", "host"):
        merger = LiveMerger.load(base, aligned, BLOCKS2, device="cpu", memory=memory)
        gradient = RatioGradient(merger)
        grads.append(gradient((0.4, 0.6), lambda m=merger: m.model(PROMPT, labels=PROMPT).loss))
    assert grads[0] == grads[1]
    assert all(g != 0.0 for g in grads[0][1])


def _meta_model(folder):
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


def test_device_map_is_layer_contiguous_and_checks_capacity(tmp_path):
    base, _ = make_pair(tmp_path)
    model = _meta_model(base)
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed = model.model.embed_tokens.weight.numel() * 4
    # device "a" holds the embedding and two layers, "b" the rest
    plan = plan_device_map(model, ["a", "b"], {"a": embed + 2 * layer + 8, "b": 10**9})
    assert plan["model.embed_tokens"] == "a"
    assert [plan[f"model.layers.{i}"] for i in range(4)] == ["a", "a", "b", "b"]
    assert plan["model.norm"] == "b" and plan["lm_head"] == "b"
    order = [plan[k] for k in plan if k.startswith("model.layers.")]
    assert order == sorted(order)  # contiguous: no layer goes back to an earlier device
    with pytest.raises(SpecError) as err:
        plan_device_map(model, ["a", "b"], {"a": layer, "b": layer})
    assert "does not fit" in str(err.value) and err.value.field == "device"


def test_tied_head_follows_the_embedding(tmp_path):
    base, _ = make_pair(tmp_path, "gemma")
    model = _meta_model(base)
    big = 10**9
    plan = plan_device_map(model, ["a", "b"], {"a": model.model.embed_tokens.weight.numel() * 4
                                               + 8, "b": big})
    # a tied head is the embedding's parameter: it goes where the embedding is
    assert plan["lm_head"] == plan["model.embed_tokens"] == "a"
    assert plan["model.norm"] == "b"


def test_forced_device_map_merges_and_evaluates_like_one_device(tmp_path):
    base, aligned = make_pair(tmp_path)
    single = LiveMerger.load(base, aligned, BLOCKS2, device="cpu")
    # the device-map path with the map forced over CPU: each "device" takes about 60 %
    split = LiveMerger.load(base, aligned, BLOCKS2, device="cpu,cpu",
                            max_memory=f"cpu={single.nbytes * 6 // 10}")
    assert hasattr(split.model, "hf_device_map")
    assert set(split.model.hf_device_map.values()) == {"cpu"}
    for ratios in RATIOS:
        single.apply(ratios)
        split.apply(ratios)
        _same(_weights(single), _weights(split))
        with torch.no_grad():
            assert torch.equal(single.model(PROMPT).logits, split.model(PROMPT).logits)


def test_parsers_name_their_field():
    assert parse_devices("cuda:0, cpu") == ["cuda:0", "cpu"]
    assert parse_devices(None) == ["auto"]
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6
    assert parse_max_memory("cuda:0=1GiB,cpu=2GiB") == {"cuda:0": 2**30, "cpu": 2 * 2**30}
    for bad, fn in [("auto,cpu", parse_devices), ("lots", parse_bytes),
                    ("cuda:0:1GiB", parse_max_memory)]:
        with pytest.raises(SpecError):
            fn(bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_modes_and_split_on_cuda(tmp_path):
    base, aligned = make_pair(tmp_path, dtype=torch.bfloat16)
    device = LiveMerger.load(base, aligned, BLOCKS2, device="cuda", memory="device")
    host = LiveMerger.load(base, aligned, BLOCKS2, device="cuda", memory="host")
    assert all(e.base.is_pinned() for e in host.entries)
    on_gpu = host.resident_bytes()["cuda:0"]
    assert on_gpu < device.resident_bytes()["cuda:0"] / 2
    split = LiveMerger.load(base, aligned, BLOCKS2, device="cuda:0,cpu",
                            max_memory=f"cuda:0={device.nbytes // 2},cpu=1GiB")
    assert set(split.placement()["devices"]) == {"cuda:0", "cpu"}
    for ratios in RATIOS:
        for m in (device, host, split):
            m.apply(ratios)
        _same(_weights(device), _weights(host))
        # the split model merges each tensor where it lives: CPU lerp vs CUDA lerp
        for name, t in _weights(split).items():
            assert torch.allclose(t.float(), _weights(device)[name].float(), atol=1e-2, rtol=0)
    torch.cuda.synchronize()
