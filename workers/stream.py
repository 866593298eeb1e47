"""The streaming merge of two safetensors checkpoints into shards, without torch.

A bounded pipeline of threads: two readers (one per checkpoint) copy each tensor, a chunk
(``CHUNK`` elements) at a time, into one of ``SLOTS`` preallocated slots, and hash what they
read (``PIECE`` bytes at a time, while they are in cache) into a sha256 of each source file,
so the manifest's hashes cost no second read and the two checkpoints are hashed in parallel
(a file whose digest is already known, ``known``, is read but not hashed); compute threads
merge each slot with numpy;
the calling thread writes the merged chunks, in plan order, into the shards, and a syncer
thread ``fdatasync``s them behind the writer. Memory is the slots plus the compute threads'
scratch, whatever the model size: a slot is reused only once its chunk is written.

The arithmetic is torch's, in numpy: workers/lerp_numpy.py.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.errors import MergeError
from workers.checkpoint import Checkpoint, TensorInfo, TensorPlan, shard_header
from workers.dtypes import DTYPE_SIZES, FLOAT_DTYPES
from workers.lerp_numpy import Scratch, lerp_into

CHUNK = 1 << 20  # elements per slot
SLOTS = 6
PIECE = 256 << 10  # bytes read and hashed at a time (stays in the L2 cache)
SYNC_EVERY = 128 << 20  # bytes written between two background fdatasyncs of a shard
_POLL = 0.05


@dataclass(frozen=True)
class Job:
    """One chunk: elements ``[start, start + count)`` of tensor ``plan.name``."""

    plan: TensorPlan
    base: TensorInfo
    aligned: TensorInfo
    ratio: float
    start: int
    count: int


class _Stopped(Exception):
    pass


class _Slot:
    def __init__(self) -> None:
        # anonymous maps, not bytearrays (which zero every byte): a page becomes resident only
        # once used, so 2-byte tensors keep half of each slot out of memory
        self.b = mmap.mmap(-1, CHUNK * 4)
        self.a = mmap.mmap(-1, CHUNK * 4)
        self.out = mmap.mmap(-1, CHUNK * 4)
        self.job: Job | None = None
        self.result: memoryview | None = None
        self.merged = threading.Event()
        self.halves = 0  # of the two reads (base, aligned), how many are still to do


class _FileHash:
    """sha256 of one source file, fed in order; ``broken`` once a read skipped bytes."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.size = file.stat().st_size
        self.h = hashlib.sha256()
        self.pos = 0
        self.broken = False


def stream_merge(
    base: Checkpoint, aligned: Checkpoint, shards: Sequence[Sequence[TensorPlan]],
    names: Sequence[str], folder: Path, ratio_of: Callable[[str], float], *,
    sync: bool = True, threads: int | None = None, on_bytes: Callable[[int], None] | None = None,
    stats: dict[str, float] | None = None, known: Mapping[Path, str] | None = None,
) -> dict[str, dict[str, str]]:
    """Write ``shards`` (files ``names`` in ``folder``) as the merge of ``base`` and ``aligned``.

    Returns the sha256 of every source weight file, ``{"base": {file: hex}, "aligned": ...}``,
    in the checkpoints' file order; the files in ``known`` (path -> hex) are not hashed, their
    digest is taken from there. ``stats``, when given, gets the seconds each stage spent
    working (summed over its threads: read, merge, write, sync), waiting (``wait_*``), its
    threads' CPU seconds (``cpu_read``, ``cpu_read_aligned``, ``cpu_compute``, ``cpu_write``,
    ``cpu_syncer``; the readers' include ``cpu_hash``, the CPU seconds of sha256).
    """
    run = _Run(base, aligned, ratio_of, threads or min(2, os.cpu_count() or 1), sync,
               known or {})
    run.stats = stats if stats is not None else {}
    try:
        run.start(shards)
        run.write(shards, names, folder, on_bytes)
        run.finish()
    except BaseException:
        run.stop.set()
        run.join()
        raise
    return {"base": run.digests(0), "aligned": run.digests(1)}


class _Run:
    def __init__(self, base: Checkpoint, aligned: Checkpoint, ratio_of: Callable[[str], float],
                 n_compute: int, sync: bool, known: Mapping[Path, str]) -> None:
        self.sources = (base, aligned)
        self.known = known
        self.ratio_of = ratio_of
        self.n_compute = n_compute
        self.sync = sync
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(SLOTS):
            self.free.put(_Slot())
        self.todo: queue.Queue[_Slot | None] = queue.Queue()
        self.order: queue.Queue[_Slot] = queue.Queue()
        self.hashes = tuple({f: _FileHash(f) for f in c.weight_files if f not in known}
                            for c in self.sources)
        self.fds = tuple({} for _ in self.sources)
        self.sync_q: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.stats: dict[str, float] = {}
        self.stats_lock = threading.Lock()
        self.aligned_q: queue.Queue[_Slot | None] = queue.Queue()  # base reader -> aligned's
        self.lock = threading.Lock()
        self.readers_left = 2

    def _took(self, key: str, since: float, clock=time.perf_counter) -> float:
        now = clock()
        with self.stats_lock:
            self.stats[key] = self.stats.get(key, 0.0) + now - since
        return now

    # ------------------------------------------------------------------ threads

    def start(self, shards: Sequence[Sequence[TensorPlan]]) -> None:
        def spawn(target, *args) -> None:
            t = threading.Thread(target=self._guard, args=(target, *args), daemon=True)
            t.start()
            self.threads.append(t)

        spawn(self._read, shards)
        spawn(self._read_aligned)
        for _ in range(self.n_compute):
            spawn(self._compute)
        spawn(self._syncer)

    def _guard(self, target, *args) -> None:
        cpu = time.thread_time()
        try:
            target(*args)
            self._took("cpu" + target.__name__, cpu, time.thread_time)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001  (handed to the writer, which raises it)
            self.errors.append(exc)
            self.stop.set()

    def _get(self, q: queue.Queue, key: str = ""):
        t0 = time.perf_counter()
        try:
            return self._get_(q)
        finally:
            self._took("wait_" + key, t0)

    def _get_(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def _jobs(self, shards: Sequence[Sequence[TensorPlan]]) -> Iterator[Job]:
        base, aligned = self.sources
        for shard in shards:
            for plan in shard:
                b, a = base.tensors[plan.name], aligned.tensors[plan.name]
                n = b.nbytes // max(1, _size(b.dtype_name))
                ratio = self.ratio_of(plan.name) if b.dtype_name in FLOAT_DTYPES else 0.0
                for start in range(0, n, CHUNK):
                    yield Job(plan, b, a, ratio, start, min(CHUNK, n - start))

    def _read(self, shards: Sequence[Sequence[TensorPlan]]) -> None:
        """The base checkpoint's reader: takes a free slot for each job, hands it to the
        aligned reader and to the writer (in plan order), and reads its half."""
        for job in self._jobs(shards):
            slot = self._get(self.free, "read")
            slot.job = job
            slot.merged.clear()
            slot.halves = 2
            self.order.put(slot)
            self.aligned_q.put(slot)
            self._read_half(0, slot)
        self.aligned_q.put(None)
        self._reader_done()

    def _read_aligned(self) -> None:
        while (slot := self._get(self.aligned_q, "read")) is not None:
            self._read_half(1, slot)
        self._reader_done()

    def _read_half(self, i: int, slot: _Slot) -> None:
        t0 = time.perf_counter()
        job = slot.job
        info, buf = (job.base, slot.b) if i == 0 else (job.aligned, slot.a)
        size = _size(info.dtype_name)
        self._read_hashed(i, info.file, memoryview(buf)[: job.count * size],
                          info.begin + job.start * size)
        self._took("read", t0)
        with self.lock:
            slot.halves -= 1
            whole = slot.halves == 0
        if whole:  # the second of the two reads to finish hands the slot on
            self.todo.put(slot)

    def _reader_done(self) -> None:
        with self.lock:
            self.readers_left -= 1
            last = self.readers_left == 0
        if last:  # every slot is in ``todo`` by now
            for _ in range(self.n_compute):
                self.todo.put(None)

    def _read_hashed(self, i: int, file: Path, view: memoryview, begin: int) -> None:
        """Read ``view`` from ``begin``; hash it, ``PIECE`` bytes at a time while they are
        in cache, when it continues the file's bytes hashed so far."""
        fh = self.hashes[i].get(file)
        if fh is not None and not fh.broken and fh.pos < begin:  # the header, or a gap
            gap = memoryview(bytearray(begin - fh.pos))
            self._pread(i, file, gap, fh.pos)
            self._hash(fh, gap)
            fh.pos = begin
        if fh is None or fh.broken or fh.pos != begin:
            if fh is not None:
                fh.broken = True  # out of order: hashed by a second pass at the end
            self._pread(i, file, view, begin)
            return
        for k in range(0, len(view), PIECE):
            piece = view[k:k + PIECE]
            self._pread(i, file, piece, begin + k)
            self._hash(fh, piece)
        fh.pos = begin + len(view)

    def _hash(self, fh: _FileHash, data: memoryview) -> None:
        t0 = time.thread_time()
        fh.h.update(data)
        self._took("cpu_hash", t0, time.thread_time)

    def _pread(self, i: int, file: Path, view: memoryview, offset: int) -> None:
        fd = self.fds[i].get(file)
        if fd is None:
            fd = self.fds[i][file] = os.open(file, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise MergeError(f"{file} is truncated (ends at byte {offset + done})")
            done += n

    def _compute(self) -> None:
        scratch = Scratch()
        while (slot := self._get(self.todo, "merge")) is not None:
            t0 = time.perf_counter()
            job = slot.job
            slot.result = lerp_into(slot.b, slot.a, slot.out, job.count, job.base.dtype_name,
                                    job.plan.dtype_name, job.ratio, job.plan.name, scratch)
            self._took("merge", t0)
            slot.merged.set()

    def _syncer(self) -> None:
        while (item := self._get(self.sync_q, "sync")) is not None:
            fd, close = item
            t0 = time.perf_counter()
            if self.sync:
                os.fdatasync(fd)
            self._took("sync", t0)
            if close:
                os.close(fd)

    # ------------------------------------------------------------------ the writer

    def write(self, shards, names, folder: Path, on_bytes) -> None:
        cpu = time.thread_time()
        self._write(shards, names, folder, on_bytes)
        self._took("cpu_write", cpu, time.thread_time)

    def _write(self, shards, names, folder: Path, on_bytes) -> None:
        for fname, shard in zip(names, shards):
            fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less umask
            try:
                _write_all(fd, shard_header(shard))
                unsynced = 0
                for plan in shard:
                    left = plan.nbytes
                    while left > 0:
                        slot = self._get(self.order, "write")
                        t0 = time.perf_counter()
                        while not slot.merged.wait(_POLL):
                            if self.stop.is_set():
                                raise _Stopped
                        t0 = self._took("wait_write", t0)
                        _write_all(fd, slot.result)
                        self._took("write", t0)
                        left -= len(slot.result)
                        unsynced += len(slot.result)
                        if on_bytes:
                            on_bytes(len(slot.result))
                        self.free.put(slot)
                        if unsynced >= SYNC_EVERY:
                            self.sync_q.put((fd, False))
                            unsynced = 0
            except BaseException:
                os.close(fd)
                raise
            self.sync_q.put((fd, True))

    def finish(self) -> None:
        self.sync_q.put(None)
        self.join()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        while not self.sync_q.empty():  # left by a stopped run: close the shards
            item = self.sync_q.get()
            if item is not None and item[1]:
                os.close(item[0])
        for fds in self.fds:
            for fd in fds.values():
                os.close(fd)
        if self.errors:
            raise self.errors[0]
        if self.stop.is_set():
            raise _Stopped("stopped")

    def digests(self, i: int) -> dict[str, str]:
        out = {}
        for file in self.sources[i].weight_files:
            if file in self.known:
                out[file.name] = self.known[file]
                continue
            fh = self.hashes[i][file]
            if not fh.broken and fh.pos == fh.size:
                out[file.name] = fh.h.hexdigest()
            else:  # read out of order (or not at all): a second pass over this file
                from workers.checkpoint import sha256_file

                out[file.name] = sha256_file(file)
        return out


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _size(name: str) -> int:
    return DTYPE_SIZES[name]
