"""A job's models and data in memory: both checkpoints as one live merger, the evaluator
with its data split and reward model, and θ_base measured (or read from its cache). What
the CLI's search and a worker's job run both start from.

Before a model loads, a worker (``confine=True``) checks the job again as the API admitted
it (service/admission.py: the roots, the link rules, the admin settings, the data), so a
file replaced after submission, a link out of the roots say, is refused with the job's
error (a local search: the same checks of the files, no roots); lm-eval tasks are built and their first documents checked
(:func:`workers.evaluate.lmeval.check_task`). After θ_base is measured, an lm-eval task whose
θ_base figure measures nothing is an error naming it (:func:`~workers.evaluate.lmeval.check_base`).
"""

from __future__ import annotations

from pathlib import Path

from service.settings import get_settings
from service.spec import JobSpec


def load_job(spec: JobSpec, *, device: str | None = "auto", confine: bool = False):
    """(LiveMerger, JobEvaluator) of a job: both checkpoints, tokenizer, data, reward model.
    ``confine``: the job came through the API; check it again as the API did (a worker)."""
    from service.admission import admit_job, check_job_files

    settings = get_settings()
    if confine:
        admit_job(spec, settings)
    else:  # a local search: the same checks without the roots
        check_job_files(spec, settings)
    check_lm_eval_tasks(spec)
    from transformers import AutoTokenizer  # the heavy data-plane imports load with a job
    from transformers.utils import logging as hf_logging

    from workers.evaluate.job import JobEvaluator
    from workers.merge import LiveMerger

    hf_logging.disable_progress_bar()  # one bar: the trials'
    merger = LiveMerger.load(spec.base_model, spec.aligned_model, spec.groups, device=device,
                             allow_pickle=settings.allow_pickle,
                             trust_remote_code=settings.trust_remote_code,
                             memory=settings.memory, max_memory=settings.max_memory)
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
        cached = evaluator.measure_base(on_batch=on_batch)
    else:
        dev = next(merger.model.parameters())
        key = base_cache_key(spec, spec.base_model, device=dev.device.type,
                             dtype=str(dev.dtype), allow_pickle=get_settings().allow_pickle)
        cached = evaluator.measure_base(cache_dir=Path(cache_dir) / "base", cache_key=key,
                                        on_batch=on_batch)
    check_lm_eval_base(spec, evaluator.base)
    return cached


def check_lm_eval_tasks(spec: JobSpec) -> None:
    """Each lm-eval tax task built and its first documents checked, before the models load."""
    lm_tasks = [t for t in spec.tax.tasks if t.type == "lm_eval"]
    if lm_tasks:
        from workers.evaluate.lmeval import check_task

        for task in lm_tasks:
            check_task(task.data, metric=task.metric, limit=task.limit,
                       label=f"tax task {task.name!r}")


def check_lm_eval_base(spec: JobSpec, base: dict) -> None:
    """An error naming the lm-eval tax task whose θ_base figure measures nothing."""
    for task in spec.tax.tasks:
        if task.type == "lm_eval":
            from workers.evaluate.lmeval import check_base

            figure = base[task.name]
            check_base(f"tax task {task.name!r}", task.data, figure["value"],
                       figure.get("per_doc"))
