"""hmaopt control plane: settings, errors, job-spec schemas and the ``hmaopt`` CLI.

Nothing under ``service`` imports torch or transformers; the data plane lives in ``workers``.
"""

from service._version import __version__

__all__ = ["__version__"]
