"""The one job status enum, shared by the database, the API, the queue and the workers."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Life of a job: queued -> running -> succeeded | failed | cancelled.

    A running job whose worker dies goes back to ``queued`` until another worker takes it.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Role(StrEnum):
    """API token roles, each including the rights of the ones before it."""

    VIEWER = "viewer"      # read jobs, trials, events
    OPERATOR = "operator"  # also submit, cancel, export
    ADMIN = "admin"        # also manage tokens

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)
