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
    """Base of every error hmaopt raises on purpose.

    A group base sets its CLI exit code in its class line (``exit_code=N``); subclasses
    inherit it.
    """

    #: process exit code used by the CLI for this group
    exit_code: int = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


class SpecError(HmaoptError, exit_code=2):
    """A job spec or command-line argument is invalid."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class RatioError(SpecError):
    """Wrong number of ratios, or a ratio outside the allowed bounds."""


class NotFoundError(HmaoptError, exit_code=3):
    """A file, folder or record does not exist."""


class ConflictError(HmaoptError, exit_code=4):
    """The target already exists, or the current state forbids the action."""


class AuthenticationError(HmaoptError, exit_code=5):
    """No API token was given, or it is unknown or revoked."""


class PermissionDeniedError(HmaoptError, exit_code=5):
    """The caller's role, or an admin setting, does not allow the action; ``field`` names
    what is missing (``role``, a header, a spec field)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class PathNotAllowedError(PermissionDeniedError):
    """A path resolves outside the configured roots."""


class DependencyUnavailableError(HmaoptError, exit_code=6):
    """An optional package or a backing service is not available."""


class CheckpointError(HmaoptError, exit_code=7):
    """A checkpoint folder cannot be read."""


class PickleRefusedError(CheckpointError):
    """A pickle (.bin/.pt) checkpoint was found and pickle loading is not allowed."""


class CheckpointMismatchError(CheckpointError):
    """Base and aligned checkpoints differ in architecture, tensor names, shapes or dtypes."""


class MergeError(HmaoptError, exit_code=8):
    """The merge cannot be carried out."""


class EvaluationError(HmaoptError, exit_code=9):
    """An evaluator failed."""
