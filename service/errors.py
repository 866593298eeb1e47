"""The hmaopt exception tree. Callers catch a group by its base class.

::

    HmaoptError                      every error hmaopt raises on purpose
    ├── SpecError                    a job spec / CLI argument is invalid (names the field)
    │   └── RatioError               wrong number of ratios, or a ratio out of bounds
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
    └── EvaluationError              an evaluator failed

Every message says what is wrong and, where there is one, what to do next.
Foreign errors (OSError, safetensors, JSON) are translated at the edge, chained to the cause.
"""

from __future__ import annotations


class HmaoptError(Exception):
    """Base of every error hmaopt raises on purpose."""

    #: process exit code used by the CLI for this group
    exit_code: int = 1


class SpecError(HmaoptError):
    """A job spec or command-line argument is invalid."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class RatioError(SpecError):
    """Wrong number of ratios, or a ratio outside the allowed bounds."""


class NotFoundError(HmaoptError):
    """A file, folder or record does not exist."""

    exit_code = 3


class ConflictError(HmaoptError):
    """The target already exists, or the current state forbids the action."""

    exit_code = 4


class AuthenticationError(HmaoptError):
    """No API token was given, or it is unknown or revoked."""

    exit_code = 5


class PermissionDeniedError(HmaoptError):
    """The caller's role, or an admin setting, does not allow the action."""

    exit_code = 5


class PathNotAllowedError(PermissionDeniedError):
    """A path resolves outside the configured roots."""


class DependencyUnavailableError(HmaoptError):
    """An optional package or a backing service is not available."""

    exit_code = 6


class CheckpointError(HmaoptError):
    """A checkpoint folder cannot be read."""

    exit_code = 7


class PickleRefusedError(CheckpointError):
    """A pickle (.bin/.pt) checkpoint was found and pickle loading is not allowed."""


class CheckpointMismatchError(CheckpointError):
    """Base and aligned checkpoints differ in architecture, tensor names, shapes or dtypes."""


class MergeError(HmaoptError):
    """The merge cannot be carried out."""

    exit_code = 8


class EvaluationError(HmaoptError):
    """An evaluator failed."""

    exit_code = 9
