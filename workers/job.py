"""A job's models and data in memory: both checkpoints as one live merger, the evaluator
with its data split and reward model, and θ_base measured (or read from its cache). What
the CLI's search and a worker's job run both start from.
"""

from __future__ import annotations

from pathlib import Path

from service.settings import get_settings
from service.spec import JobSpec


def load_job(spec: JobSpec, *, device: str | None = "auto"):
    """(LiveMerger, JobEvaluator) of a job: both checkpoints, tokenizer, data, reward model."""
    from transformers import AutoTokenizer  # the heavy data-plane imports load with a job
    from transformers.utils import logging as hf_logging

    from workers.evaluate.job import JobEvaluator
    from workers.merge import LiveMerger

    hf_logging.disable_progress_bar()  # one bar: the trials'
    settings = get_settings()
    merger = LiveMerger.load(spec.base_model, spec.aligned_model, spec.groups, device=device,
                             allow_pickle=settings.allow_pickle,
                             trust_remote_code=settings.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model,
                                              trust_remote_code=settings.trust_remote_code)
    evaluator = JobEvaluator.load(spec, merger.model, tokenizer,
                                  trust_remote_code=settings.trust_remote_code)
    return merger, evaluator


def measure_base(merger, evaluator, *, cache_dir: str | Path | None = None,
                 on_batch=None) -> bool:
    """Write θ_base into the live model and measure it (from the cache in ``cache_dir``/base
    when there). Returns True on a cache hit."""
    from workers.evaluate.basecache import base_cache_key

    spec = evaluator.spec
    merger.apply([0.0] * merger.grouping.n_ratios)
    if cache_dir is None:
        return evaluator.measure_base(on_batch=on_batch)
    dev = next(merger.model.parameters())
    key = base_cache_key(spec, spec.base_model, device=dev.device.type, dtype=str(dev.dtype),
                         allow_pickle=get_settings().allow_pickle)
    return evaluator.measure_base(cache_dir=Path(cache_dir) / "base", cache_key=key,
                                  on_batch=on_batch)
