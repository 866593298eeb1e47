from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from service.errors import CheckpointError, CheckpointMismatchError, NotFoundError, PickleRefusedError
from tests.models import make_tiny, read_folder as _reference
from workers.checkpoint import (
    Checkpoint,
    TensorPlan,
    check_compatible,
    plan_shards,
    shard_file_names,
    write_index,
    write_shard,
)


def test_reads_single_file_exactly(llama_pair):
    base, _ = llama_pair
    ckpt = Checkpoint.open(base)
    ref = _reference(base)
    assert ckpt.format == "safetensors" and set(ckpt.tensors) == set(ref)
    for name, t in ref.items():
        assert torch.equal(ckpt.read(name), t)


def test_reads_sharded_checkpoint(tmp_path):
    folder = make_tiny(tmp_path / "sharded", "qwen2", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    ckpt = Checkpoint.open(folder)
    assert len(ckpt.weight_files) > 1
    ref = _reference(folder)
    assert set(ckpt.tensors) == set(ref)
    assert all(torch.equal(ckpt.read(n), t) for n, t in ref.items())


def test_an_index_naming_shards_outside_its_folder_is_refused(tmp_path):
    folder = make_tiny(tmp_path / "sharded", "qwen2", max_shard_size="20KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / shard).read_bytes())
    for bad in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        index["weight_map"] = dict.fromkeys(index["weight_map"], bad)
        index_file.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="names shards outside its folder"):
            Checkpoint.open(folder)


def test_mismatch_names_the_differences(tmp_path, llama_pair):
    base, _ = llama_pair
    fewer_layers = make_tiny(tmp_path / "l3", "llama", num_hidden_layers=3, tie_word_embeddings=False)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.3\.[\w.]+ only in base"):
        check_compatible(Checkpoint.open(base), Checkpoint.open(fewer_layers))
    wider = make_tiny(tmp_path / "wide", "llama", intermediate_size=80, tie_word_embeddings=False)
    with pytest.raises(CheckpointMismatchError, match=r"mlp\.down_proj\.weight: shape \[32, 64\] vs \[32, 80\]"):
        check_compatible(Checkpoint.open(base), Checkpoint.open(wider))
    half = make_tiny(tmp_path / "bf16", "llama", dtype=torch.bfloat16, tie_word_embeddings=False)
    with pytest.raises(CheckpointMismatchError, match="dtype F32 vs BF16"):
        check_compatible(Checkpoint.open(base), Checkpoint.open(half))
    other = make_tiny(tmp_path / "mistral", "mistral")
    with pytest.raises(CheckpointMismatchError, match="config model_type: base 'llama' vs aligned 'mistral'"):
        check_compatible(Checkpoint.open(base), Checkpoint.open(other))


def test_pickle_is_refused_unless_allowed(tmp_path, llama_pair):
    import shutil

    (tmp_path / "pkl").mkdir()
    shutil.copy(llama_pair[0] / "config.json", tmp_path / "pkl")
    torch.save(_reference(llama_pair[0]), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pickle .*--allow-pickle"):
        Checkpoint.open(tmp_path / "pkl")
    ckpt = Checkpoint.open(tmp_path / "pkl", allow_pickle=True)
    assert ckpt.format == "pickle"
    ref = _reference(llama_pair[0])
    assert set(ckpt.tensors) == set(ref)
    assert all(torch.equal(ckpt.read(n), t) for n, t in ref.items())


def test_missing_pieces_are_named(tmp_path, llama_pair):
    with pytest.raises(NotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="config.json is missing"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotFoundError, match="no weights"):
        Checkpoint.open(tmp_path / "empty")
    folder = make_tiny(tmp_path / "sharded", "llama", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(NotFoundError, match=f"missing: {shard.name}"):
        Checkpoint.open(folder)


def test_truncated_and_garbage_files(tmp_path, llama_pair):
    import shutil

    folder = tmp_path / "trunc"
    shutil.copytree(llama_pair[0], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="bad byte range"):
        Checkpoint.open(folder)
    (folder / "model.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint.open(folder)


def test_writer_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4, 4).to(torch.float16),
        "e": torch.zeros(0, 3),
    }
    plans = [TensorPlan(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(plans, max_shard_bytes=64)
    assert len(shards) > 1 and [p.name for s in shards for p in s] == list(tensors)
    assert all(sum(p.nbytes for p in s) <= 64 or len(s) == 1 for s in shards)
    names = shard_file_names(len(shards))
    for fname, shard in zip(names, shards):
        write_shard(tmp_path / fname, shard, lambda p: tensors[p.name])
    write_index(tmp_path, shards, names)
    back = _reference(tmp_path)
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in plans)
    # and our reader agrees with the library on its own files
    (tmp_path / "config.json").write_text("{}")
    ours = Checkpoint.open(tmp_path)
    assert all(torch.equal(ours.read(n), t) for n, t in tensors.items())


def test_reader_matches_library_written_file(tmp_path):
    tensors = {"x": torch.randn(2, 3), "y": torch.ones(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint.open(tmp_path)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())
