"""The sources' sha256 remembered between exports (workers/hashcache.py), and never stale."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch

from service.errors import MergeError
from service.spec import GroupSpec
from tests.workers.test_stream import _checkpoint, _random
from workers import hashcache, stream
from workers.export import MANIFEST, export_merge
from workers.hashcache import FileId, HashCache

UNIFORM = GroupSpec(scheme="uniform")


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """A sharded bf16 pair, every file cacheable (no size floor, no settling time)."""
    monkeypatch.setattr(hashcache, "MIN_BYTES", 0)
    monkeypatch.setattr(hashcache, "SETTLE_NS", 0)
    gen = torch.Generator().manual_seed(3)
    names = [f"model.layers.0.t{i}" for i in range(4)]
    shard = lambda n: f"part{int(n[-1]) % 2}.safetensors"  # noqa: E731
    base = _checkpoint(tmp_path / "base", {n: _random((500,), torch.bfloat16, gen) for n in names},
                       shard)
    aligned = _checkpoint(tmp_path / "aligned",
                          {n: _random((500,), torch.bfloat16, gen) for n in names}, shard)
    return base, aligned


class Spy:
    """Records which files the stream was told it need not hash."""

    def __init__(self, monkeypatch):
        self.known: list[set[str]] = []
        real = stream.stream_merge

        def spy(*args, known=None, **kwargs):
            self.known.append({f.name + "@" + f.parent.name for f in (known or {})})
            return real(*args, known=known, **kwargs)

        monkeypatch.setattr(stream, "stream_merge", spy)


def _sha(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.glob("*.safetensors"))}


def _export(pair, out, cache, **kw):
    res = export_merge(*pair, out, UNIFORM, [0.4], hash_cache=cache, **kw)
    return json.loads((res.out / MANIFEST).read_text())["source_sha256"]


def _all(pair):
    return {f"{f.name}@{folder.name}" for folder in pair for f in folder.glob("*.safetensors")}


def test_second_export_reads_the_digests_and_they_are_the_files_own(tmp_path, pair, monkeypatch):
    spy = Spy(monkeypatch)
    cache = tmp_path / "cache"
    first = _export(pair, tmp_path / "o1", cache)
    assert len(list(cache.glob("*.json"))) == 4
    second = _export(pair, tmp_path / "o2", cache)
    assert spy.known == [set(), _all(pair)]  # hashed the first time, remembered the second
    want = {"base": _sha(pair[0]), "aligned": _sha(pair[1])}
    assert first == second == want


def test_a_rewritten_file_is_hashed_again_even_with_its_old_mtime(tmp_path, pair, monkeypatch):
    spy = Spy(monkeypatch)
    cache = tmp_path / "cache"
    _export(pair, tmp_path / "o1", cache)
    victim = pair[1] / "part1.safetensors"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, in place (same inode), then the old times put back
    with open(victim, "r+b") as f:
        f.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_ino == st.st_ino and victim.stat().st_mtime_ns == st.st_mtime_ns
    got = _export(pair, tmp_path / "o2", cache)
    assert spy.known[1] == _all(pair) - {"part1.safetensors@aligned"}
    assert got["aligned"]["part1.safetensors"] == hashlib.sha256(data).hexdigest()
    assert got == {"base": _sha(pair[0]), "aligned": _sha(pair[1])}
    _export(pair, tmp_path / "o3", cache)  # and the new digest is remembered in turn
    assert spy.known[2] == _all(pair)


def test_touch_rename_and_replace_are_misses(tmp_path, pair, monkeypatch):
    spy = Spy(monkeypatch)
    cache = tmp_path / "cache"
    _export(pair, tmp_path / "o1", cache)
    touched, replaced = pair[0] / "part0.safetensors", pair[0] / "part1.safetensors"
    time.sleep(0.01)
    os.utime(touched)  # same bytes, new mtime: hashed again (to the same digest)
    fresh = replaced.with_name("new.tmp")
    fresh.write_bytes(replaced.read_bytes())
    os.replace(fresh, replaced)  # a new inode with the same bytes
    got = _export(pair, tmp_path / "o2", cache)
    assert spy.known[1] == _all(pair) - {"part0.safetensors@base", "part1.safetensors@base"}
    assert got == {"base": _sha(pair[0]), "aligned": _sha(pair[1])}


def test_entries_must_match_every_field_and_be_well_formed(tmp_path, pair):
    cache = HashCache(tmp_path / "cache")
    f = pair[0] / "part0.safetensors"
    ident = FileId.of(f)
    assert cache.put(f, ident, "ab" * 32) and cache.get(f, ident) == "ab" * 32
    for field in ("dev", "ino", "size", "mtime_ns", "ctime_ns"):
        other = FileId(**{**ident.__dict__, field: getattr(ident, field) + 1})
        assert cache.get(f, other) is None, field
    entry = next((tmp_path / "cache").glob("*.json"))
    for bad in ("not json", json.dumps({**ident.__dict__, "sha256": "xyz"}), "[]"):
        entry.write_text(bad)
        assert cache.get(f, ident) is None


def test_recent_and_small_files_are_not_remembered(tmp_path, pair, monkeypatch):
    cache = HashCache(tmp_path / "cache")
    f = pair[0] / "part0.safetensors"
    ident = FileId.of(f)
    monkeypatch.setattr(hashcache, "SETTLE_NS", 2_000_000_000)
    assert not cache.put(f, ident, "ab" * 32)  # written just now: could change within a tick
    assert cache.put(f, ident, "ab" * 32, now_ns=ident.ctime_ns + 3_000_000_000)
    monkeypatch.setattr(hashcache, "MIN_BYTES", ident.size + 1)
    assert cache.get(f, ident) is None
    assert not cache.put(f, ident, "ab" * 32, now_ns=ident.ctime_ns + 3_000_000_000)


def test_a_source_changed_during_the_merge_fails_the_export(tmp_path, pair, monkeypatch):
    real = stream.stream_merge

    def meddle(*args, **kwargs):
        out = real(*args, **kwargs)
        with open(pair[1] / "part0.safetensors", "ab") as f:
            f.write(b"\0")
        return out

    monkeypatch.setattr(stream, "stream_merge", meddle)
    with pytest.raises(MergeError, match="changed while it was being merged"):
        _export(pair, tmp_path / "o1", tmp_path / "cache")
    assert not (tmp_path / "o1").exists() and not list((tmp_path / "cache").glob("*.json"))


def test_disabled_cache_and_torch_path(tmp_path, pair, monkeypatch):
    spy = Spy(monkeypatch)
    cache = tmp_path / "cache"
    _export(pair, tmp_path / "o1", False)
    assert spy.known == [set()] and not cache.exists()
    gen = torch.Generator().manual_seed(4)
    f64 = [_checkpoint(tmp_path / w, {"model.layers.0.w": _random((300,), torch.float64, gen)})
           for w in ("b64", "a64")]
    _export(f64, tmp_path / "o2", cache)  # F64: the torch path, hashed there
    assert len(list(cache.glob("*.json"))) == 2
    entry = next(cache.glob("*.json"))
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps({**data, "sha256": "cd" * 32}))  # the remembered digest is used
    got = _export(f64, tmp_path / "o3", cache)
    assert "cd" * 32 in {got["base"]["model.safetensors"], got["aligned"]["model.safetensors"]}


def test_prune_removes_unused_entries(tmp_path, pair):
    cache = HashCache(tmp_path / "cache")
    f = pair[0] / "part0.safetensors"
    ident = FileId.of(f)
    cache.put(f, ident, "ab" * 32)
    entry = next((tmp_path / "cache").glob("*.json"))
    old = time.time() - 40 * 86400
    os.utime(entry, (old, old))
    cache.prune()
    assert not entry.exists()
