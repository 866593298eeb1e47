"""The stored states, one ``str`` enum each, shared by the database, the API, the queue,
the scheduler and the workers (stored as their plain string values)."""

from __future__ import annotations

from enum import StrEnum


class _InGroup:
    """A read-only bool attribute of an enum member: whether it is in the module-level set
    named ``group`` (defined after the class). A descriptor, so Enum leaves it a non-member."""

    def __init__(self, group: str, doc: str) -> None:
        self.group, self.__doc__ = group, doc

    def __get__(self, member, owner=None):
        return self if member is None else member in globals()[self.group]


class JobStatus(StrEnum):
    """Life of a job: queued -> running -> succeeded | failed | cancelled.

    A running job whose worker dies goes back to ``queued`` until another worker takes it.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    terminal = _InGroup("TERMINAL", "Nothing more happens to a job in this status.")


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Role(StrEnum):
    """API token roles, each including the rights of the ones before it."""

    VIEWER = "viewer"      # read jobs, trials, events
    OPERATOR = "operator"  # also submit, cancel, export
    ADMIN = "admin"        # also manage tokens

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


class PipelineRunStatus(StrEnum):
    """Life of a pipeline run (``hmaopt_pipeline_runs.status``; the scheduler moves it, one
    compare-and-set of the status per step):

    - pending -> starting -> running (its job queued) | skipped (no new checkpoint);
    - running -> deciding (the job ended) -> promoting (the export queued) | remeasuring
      (a job re-measures the champion on this run's data, then deciding again) |
      succeeded (kept) | failed;
    - promoting -> switching (the export ended) -> succeeded (promoted, or kept) | failed.

    ``starting``, ``deciding`` and ``switching`` are transient: a scheduler holds them only
    while it works on the run; held too long, the run is failed. A run claimed for a missed
    time under ``missed: skip`` starts as ``skipped``.
    """

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    REMEASURING = "remeasuring"
    DECIDING = "deciding"
    PROMOTING = "promoting"
    SWITCHING = "switching"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"

    done = _InGroup("RUN_DONE", "Nothing more happens to a run in this status.")
    transient = _InGroup("RUN_TRANSIENT",
                         "A scheduler holds this status only while it works on the run.")


#: run statuses after which nothing more happens to a run
RUN_DONE = frozenset({PipelineRunStatus.SUCCEEDED, PipelineRunStatus.SKIPPED,
                      PipelineRunStatus.FAILED})
#: run statuses a scheduler holds only while it works on the run
RUN_TRANSIENT = frozenset({PipelineRunStatus.STARTING, PipelineRunStatus.DECIDING,
                           PipelineRunStatus.SWITCHING})


class ExportStatus(StrEnum):
    """Life of a job's export of its best merge (``hmaopt_jobs.export_status``; None until
    the first export is asked): queued -> running -> succeeded | failed.

    A new export may be asked again once the last one succeeded or failed; a running export
    whose worker died is failed by the dead-worker recovery.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    active = _InGroup("EXPORT_ACTIVE",
                      "An export in this status is under way (a second one is refused).")


#: export statuses of an export under way
EXPORT_ACTIVE = frozenset({ExportStatus.QUEUED, ExportStatus.RUNNING})


class WorkerState(StrEnum):
    """Life of a worker process (``hmaopt_workers.state``): idle <-> busy (on a job) ->
    stopped (it shut down) | dead (it stopped reporting; a maintainer declared it)."""

    IDLE = "idle"
    BUSY = "busy"
    STOPPED = "stopped"
    DEAD = "dead"

    alive = _InGroup("WORKER_ALIVE", "A worker in this state claims to be alive.")


#: worker states of a process that claims to be alive
WORKER_ALIVE = (WorkerState.IDLE, WorkerState.BUSY)


class TrialStatus(StrEnum):
    """How a finished trial ended (``hmaopt_trials.state``; Optuna's ``TrialState`` is the
    search's own): complete (every stage measured) or pruned (stopped after stage 1). Only
    finished trials have a row, so there is no earlier state."""

    COMPLETE = "complete"
    PRUNED = "pruned"


class DeliveryStatus(StrEnum):
    """Life of a webhook delivery: pending (retried with backoff) -> delivered | failed
    (every attempt failed, or the hook was removed from the pipeline)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
