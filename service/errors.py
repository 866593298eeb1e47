"""The hmaopt exception tree. Callers catch a group by its base class.

::

    HmaoptError                      every error hmaopt raises on purpose
    ├── SpecError                    a job spec / CLI argument is invalid (names the field)
    │   ├── RatioError               wrong number of ratios, or a ratio out of bounds
    │   └── UsageError               the command line does not parse (argparse)
    ├── NotFoundError                a file, folder or record does not exist
    ├── ConflictError                the target already exists / state forbids the action
    ├── AuthenticationError          no API token, or an unknown / revoked one
    ├── PermissionDeniedError        the caller or the settings do not allow the action
    │   └── PathNotAllowedError      a path resolves outside the configured roots
    ├── DependencyUnavailableError   an optional package or a service is missing
    ├── CheckpointError              a checkpoint cannot be read
    │   ├── PickleRefusedError       a pickle checkpoint without explicit permission
    │   └── CheckpointMismatchError  base and aligned checkpoints do not match
    ├── MergeError                   the merge itself cannot be done
    ├── EvaluationError              an evaluator failed
    └── OutcomeError                 a job ran but did not give what was asked (CLI waits)
        ├── NoFeasibleMergeError     the search ran; no merge stays within the tax budget
        ├── JobFailedError           a job, an export or a pipeline run failed
        └── NoResultError            a job was cancelled, a pipeline run skipped

Every message says what is wrong and, where there is one, what to do next.
Foreign errors (OSError, safetensors, JSON) are translated at the edge, chained to the cause.

Each group has one CLI exit code (``ExitCode``, the README's table) and one error code
(``code``: the ``error`` of a JSON error body, the same names as the API's).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every ``hmaopt`` command: one per error group, the same in every
    command (README, *Exit codes*)."""

    OK = 0
    ERROR = 1          # any other error (a server's 400 or 500)
    SPEC = 2           # invalid spec or command line (argparse's usage errors too)
    NOT_FOUND = 3      # a file, folder, job or trial does not exist
    CONFLICT = 4       # already exists (--overwrite), already finished, study exists (--resume)
    AUTH = 5           # no token, unknown or revoked, role too low, path outside the roots
    UNAVAILABLE = 6    # server unreachable, its database or Redis down, a package missing
    CHECKPOINT = 7     # unreadable or mismatched checkpoints, pickle refused
    MERGE = 8
    EVALUATION = 9
    NO_FEASIBLE = 10   # the search ran and found no merge within the tax budget
    JOB_FAILED = 11    # the job, the export or the pipeline run failed
    NO_RESULT = 12     # the job was cancelled, the pipeline run skipped
    INTERRUPTED = 130  # Ctrl-C


class HmaoptError(Exception):
    """Base of every error hmaopt raises on purpose.

    A group base sets its CLI exit code and its error code in its class line
    (``exit_code=ExitCode.X, code="x"``); subclasses inherit them.
    """

    #: process exit code used by the CLI for this group
    exit_code: int = ExitCode.ERROR
    #: machine-readable name of the group (``error`` in JSON error bodies)
    code: str = "error"

    def __init_subclass__(cls, exit_code: int | None = None, code: str | None = None,
                          **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code
        if code is not None:
            cls.code = code


class SpecError(HmaoptError, exit_code=ExitCode.SPEC, code="invalid_spec"):
    """A job spec or command-line argument is invalid."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class RatioError(SpecError):
    """Wrong number of ratios, or a ratio outside the allowed bounds."""


class UsageError(SpecError, code="usage"):
    """The command line does not parse; ``usage`` is the command's usage line."""

    def __init__(self, message: str, *, usage: str = "") -> None:
        self.usage = usage
        super().__init__(message)


class NotFoundError(HmaoptError, exit_code=ExitCode.NOT_FOUND, code="not_found"):
    """A file, folder or record does not exist."""


class ConflictError(HmaoptError, exit_code=ExitCode.CONFLICT, code="conflict"):
    """The target already exists, or the current state forbids the action."""


class AuthenticationError(HmaoptError, exit_code=ExitCode.AUTH, code="unauthenticated"):
    """No API token was given, or it is unknown or revoked."""


class PermissionDeniedError(HmaoptError, exit_code=ExitCode.AUTH, code="forbidden"):
    """The caller's role, or an admin setting, does not allow the action; ``field`` names
    what is missing (``role``, a header, a spec field)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class PathNotAllowedError(PermissionDeniedError):
    """A path resolves outside the configured roots."""


class DependencyUnavailableError(HmaoptError, exit_code=ExitCode.UNAVAILABLE,
                                 code="unavailable"):
    """An optional package or a backing service is not available."""


class CheckpointError(HmaoptError, exit_code=ExitCode.CHECKPOINT, code="checkpoint"):
    """A checkpoint folder cannot be read."""


class PickleRefusedError(CheckpointError):
    """A pickle (.bin/.pt) checkpoint was found and pickle loading is not allowed."""


class CheckpointMismatchError(CheckpointError):
    """Base and aligned checkpoints differ in architecture, tensor names, shapes or dtypes."""


class MergeError(HmaoptError, exit_code=ExitCode.MERGE, code="merge"):
    """The merge cannot be carried out."""


class EvaluationError(HmaoptError, exit_code=ExitCode.EVALUATION, code="evaluation"):
    """An evaluator failed."""


class OutcomeError(HmaoptError):
    """A job ran (or was asked for) but did not give what the command waited for."""


class NoFeasibleMergeError(OutcomeError, exit_code=ExitCode.NO_FEASIBLE,
                           code="no_feasible_merge"):
    """The search ran, and no merge it tried stays within the tax budget."""


class JobFailedError(OutcomeError, exit_code=ExitCode.JOB_FAILED, code="job_failed"):
    """A job, an export or a pipeline run failed."""


class NoResultError(OutcomeError, exit_code=ExitCode.NO_RESULT, code="no_result"):
    """A job was cancelled, or a pipeline run skipped: it ended without a result."""
