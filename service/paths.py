"""Path resolution inside the configured roots: the one place a submitted path is checked.

A job submitted to the server may only read models under ``HMAOPT_MODEL_ROOTS`` and data
under ``HMAOPT_DATA_ROOTS``, and write its export under the model roots. Paths are resolved
with symlinks followed (``realpath``), so a link inside a root that points outside is refused,
and so is a model folder holding such a link (a shard or tokenizer file linked from
elsewhere). Relative paths are looked up in each root in turn. A path that no file system
can hold (a NUL byte, text that is not a file name, a component over 255 bytes, over 4096
bytes in all) is a SpecError naming the field, before any file system call.

The API checks a job when it is submitted (service/admission.py); a worker checks it again
when it loads the job (:func:`service.admission.admit_job` with the same settings), so a file
replaced by a link after submission is refused there too.
"""

from __future__ import annotations

import os
from pathlib import Path

from service.errors import PathNotAllowedError, PermissionDeniedError, SpecError
from service.settings import Settings
from service.spec import JobSpec

#: spec fields that name models (the rest name data)
MODEL_FIELDS = ("base_model", "aligned_model", "reward.model")
#: bytes of one path component (NAME_MAX of Linux file systems) and of a whole path (PATH_MAX)
NAME_MAX, PATH_MAX = 255, 4096


def check_path_text(field: str, raw: str) -> None:
    """SpecError naming ``field`` when ``raw`` cannot be a path: a NUL byte, text that does
    not encode as a file name, a component over NAME_MAX bytes, over PATH_MAX bytes in all."""
    if "\x00" in raw:
        raise SpecError("the path holds a NUL byte", field=field)
    try:
        encoded = os.fsencode(raw)
    except UnicodeError as exc:
        raise SpecError(f"the path is not valid file-name text ({exc.reason} at character "
                        f"{exc.start})", field=field) from exc
    if len(encoded) >= PATH_MAX:
        raise SpecError(f"the path is {len(encoded)} bytes long; paths are under {PATH_MAX} "
                        "bytes", field=field)
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise SpecError(f"a component of the path is {len(longest)} bytes long "
                        f"({os.fsdecode(longest[:40])}...); file names are at most {NAME_MAX} "
                        "bytes", field=field)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_path(field: str, raw: str, roots: list[Path], *, must_exist: bool = True,
                 kind: str | None = None) -> str:
    """``raw`` resolved (symlinks followed) inside one of ``roots``, else PathNotAllowedError.

    An output (``must_exist=False``) must lie strictly below a root, never be one. ``kind``
    (model or data, for messages) defaults from the job-spec field name.
    """
    check_path_text(field, raw)
    try:
        return _resolve(field, raw, roots, must_exist=must_exist, kind=kind)
    except OSError as exc:  # e.g. a root joined with the path is over PATH_MAX
        raise SpecError(f"{raw} cannot be resolved ({exc.strerror or exc})", field=field) from exc


def _resolve(field: str, raw: str, roots: list[Path], *, must_exist: bool,
             kind: str | None) -> str:
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    kind = kind or ("model" if field in MODEL_FIELDS or field == "export.dir" else "data")
    setting = f"HMAOPT_{kind.upper()}_ROOTS"
    if not real_roots:
        raise PathNotAllowedError(f"{field}: no {kind} roots are configured; set {setting}")
    if not Path(raw).is_absolute() and ".." in Path(raw).parts:
        raise PathNotAllowedError(f"{field}: {raw} climbs out with '..'; give a path inside "
                                  f"the {kind} roots ({setting})")
    candidates = ([Path(raw)] if Path(raw).is_absolute()
                  else [root / raw for root in real_roots])
    resolved = [Path(os.path.realpath(c)) for c in candidates]
    existing = [p for p in resolved if p.exists()]
    if must_exist and not existing:
        where = raw if Path(raw).is_absolute() else f"{raw} (looked in {', '.join(map(str, real_roots))})"
        # outside the roots or not: do not tell which files exist outside the roots
        if Path(raw).is_absolute() and not _inside(resolved[0], real_roots):
            raise PathNotAllowedError(
                f"{field}: {raw} is outside the allowed {kind} roots ({setting}: "
                f"{', '.join(map(str, real_roots))})")
        raise SpecError(f"{where} does not exist", field=field)
    path = (existing or resolved)[0]
    if not _inside(path, real_roots):
        raise PathNotAllowedError(
            f"{field}: {raw} resolves outside the allowed {kind} roots ({setting}: "
            f"{', '.join(map(str, real_roots))})")
    if not must_exist and path in real_roots:
        raise PathNotAllowedError(f"{field}: {raw} is a root itself; write into a folder "
                                  "below it")
    return str(path)


def check_folder(field: str, folder: str, roots: list[Path], *, kind: str = "model") -> None:
    """Every entry below ``folder`` resolves inside ``roots`` (linked folders are walked too,
    each once), and a weight index names its shards by plain file names: a model folder in a
    root cannot pull a shard, a tokenizer or a config from outside. Messages name the entry,
    not where it points."""
    import json

    real_roots = [Path(os.path.realpath(r)) for r in roots]
    setting = f"HMAOPT_{kind.upper()}_ROOTS"

    def unreadable(exc: OSError) -> None:
        raise PathNotAllowedError(f"{field}: {exc.filename} cannot be read ({exc.strerror})")

    seen: set[str] = set()
    for here, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real_here = os.path.realpath(here)
        if real_here in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real_here)
        for name in dirs + files:
            entry = Path(here) / name
            if not _inside(Path(os.path.realpath(entry)), real_roots):
                raise PathNotAllowedError(
                    f"{field}: {entry} is a link that resolves outside the allowed {kind} "
                    f"roots ({setting}); copy the file into the folder")
        for name in files:
            if name.endswith(".index.json"):
                try:
                    shards = json.loads((Path(here) / name).read_text()).get("weight_map", {})
                except (OSError, ValueError, AttributeError):
                    continue  # not an index we read; the loader reports what is wrong
                bad = [f for f in (shards.values() if isinstance(shards, dict) else [])
                       if not isinstance(f, str) or Path(f).name != f or f in (".", "..")]
                if bad:
                    raise PathNotAllowedError(
                        f"{field}: {Path(here) / name} names shards outside its folder "
                        f"({', '.join(map(str, bad[:3]))}); shards are plain file names")


def check_output(field: str, out: str, spec: JobSpec) -> None:
    """An export folder may neither hold nor lie inside one of the job's input models."""
    target = Path(out)
    for name, path in spec.paths().items():
        if name in MODEL_FIELDS:
            p = Path(path)
            if target == p or target.is_relative_to(p) or p.is_relative_to(target):
                raise PathNotAllowedError(f"{field}: {out} overlaps the job's {name} ({path}); "
                                          "export into a folder of its own")


def check_model_paths(spec: JobSpec, settings: Settings) -> None:
    """The job's base and aligned folders checked again as at submission (inside the model
    roots, no link out): what an export of the job reads, checked when it reads it."""
    for field in ("base_model", "aligned_model"):
        path = resolve_path(field, getattr(spec, field), settings.model_roots)
        check_folder(field, path, settings.model_roots)


def resolve_job_paths(spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec with every path resolved inside the roots; refuses what the settings forbid."""
    if spec.reward.type == "python" and not settings.allow_python_reward:
        raise PermissionDeniedError(
            "reward.type: python rewards run code named by the job; the server refuses them "
            "unless the admin sets HMAOPT_ALLOW_PYTHON_REWARD=true")

    def resolve(field: str, raw: str) -> str:
        roots = settings.model_roots if field in MODEL_FIELDS else settings.data_roots
        path = resolve_path(field, raw, roots)
        if field in MODEL_FIELDS and os.path.isdir(path):
            check_folder(field, path, roots)
        return path

    resolved = spec.with_paths(resolve)
    if spec.export is not None:
        out = resolve_path("export.dir", spec.export.dir, settings.model_roots, must_exist=False)
        check_output("export.dir", out, resolved)
        resolved = resolved.model_copy(update={"export": spec.export.model_copy(
            update={"dir": out})})
    return resolved
