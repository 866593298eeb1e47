"""The surroundings of one lm-evaluation-harness run (workers/evaluate/lmeval.py): offline,
quiet, seeded.

- :func:`offline`: no hub access during the run (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
  set, and the flags huggingface_hub and datasets read at import time set too), so a task
  that names a hub data set fails at once instead of retrying for tens of seconds.
- :func:`collected`: lm-eval's log records (and those of datasets and huggingface_hub) of
  WARNING and above are collected instead of printed, and summarised in one warning of this
  module per task, once per process for the same set of messages: a wrong ``doc_to_target``
  warns once per document, which would bury the worker's log. The counts of the last run
  of a task stay in :data:`LAST_WARNINGS` for the error messages that need them.
- :func:`quiet_bars`: no progress bars from lm-eval's request building or from datasets.
- :func:`seeded`: lm-eval's default seeds for the run; the caller's random states back after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: lm-eval's default seeds (simple_evaluate): python 0, numpy / torch / few-shot 1234
PY_SEED, SEED = 0, 1234
#: loggers whose records are collected during a run
COLLECTED_LOGGERS = ("lm_eval", "datasets", "huggingface_hub")
#: per task (its YAML's path, else its name): the warnings of its last run (first line of
#: each message, with counts)
LAST_WARNINGS: dict[str, Counter] = {}
_SUMMARISED: set[tuple[str, frozenset]] = set()
_NUMBERS = re.compile(r"\d+")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub access off for the run (environment and the libraries' import-time flags)."""
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags: list[tuple[object, str, object]] = []
    try:
        import huggingface_hub.constants as hub_constants

        flags.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
    except ImportError:  # pragma: no cover - lm-eval depends on it
        pass
    try:
        import datasets.config as ds_config

        flags += [(ds_config, n, getattr(ds_config, n)) for n in
                  ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(ds_config, n)]
    except ImportError:  # pragma: no cover
        pass
    os.environ.update({k: "1" for k in env})
    for module, name, _ in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in flags:
            setattr(module, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().strip().split("\n", 1)[0].strip()
        except Exception:  # a record that does not format
            first = str(record.msg)
        self.counts[first[:200]] += 1


@contextlib.contextmanager
def collected(task: str, *, key: str | None = None) -> Iterator[Counter]:
    """Collect the run's warnings (see the module docstring); yields their counter, kept
    in :data:`LAST_WARNINGS` under ``key`` (default: the task's name)."""
    collector = _Collector()
    saved = []
    for name in COLLECTED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers[:] = [collector]
        logger.propagate = False
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield collector.counts
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        LAST_WARNINGS[key or task] = collector.counts
        summarise(task, collector.counts)


def summarise(task: str, counts: Counter) -> None:
    """One warning for the collected messages of a run of ``task``; the same kinds of
    messages again (numbers aside) only at DEBUG."""
    if not counts:
        return
    key = (task, frozenset(_NUMBERS.sub("#", m) for m in counts))
    level = logging.DEBUG if key in _SUMMARISED else logging.WARNING
    _SUMMARISED.add(key)
    log.log(level, "lm-eval task %r: %d warning(s) from lm-eval: %s", task,
            sum(counts.values()), describe(counts))


def describe(counts: Counter, most: int = 3) -> str:
    """The most frequent messages with their counts, for a log line or an error."""
    shown = [f"{m!r}" + (f" (x{n})" if n > 1 else "") for m, n in counts.most_common(most)]
    more = len(counts) - most
    return "; ".join(shown) + (f"; and {more} other message(s)" if more > 0 else "")


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    """No progress bars from lm-eval's request building or from datasets."""
    import lm_eval.api.task as task_module

    # Task.build_all_requests shows a bar that no argument turns off.
    tqdm = getattr(task_module, "tqdm", None)
    tqdm = getattr(tqdm, "hmaopt_original", tqdm)
    if tqdm is not None:
        def silent(*args, **kwargs):
            return tqdm(*args, **{**kwargs, "disable": True})

        silent.hmaopt_original = tqdm
        task_module.tqdm = silent
    bars_were_on = _datasets_bars(False)
    try:
        yield
    finally:
        if tqdm is not None:
            task_module.tqdm = tqdm
        if bars_were_on:
            _datasets_bars(True)


def _datasets_bars(on: bool) -> bool:
    """Turn datasets' progress bars on/off; whether they were on."""
    try:
        import datasets
    except ImportError:
        return False
    was_on = not datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    return was_on


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """lm-eval's default seeds for the run; the caller's random states back afterwards."""
    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    random.seed(PY_SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
