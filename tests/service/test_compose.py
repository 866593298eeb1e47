"""Static checks of the deployment files: docker-compose.yml, Dockerfile, .dockerignore and
docs/deployment.md.

Docker does not run on the dev machines nor in CI, so nothing here builds or starts a
container. Instead the files are read as data and held against the code they configure:
every environment variable the stack sets must be a field of ``service.settings.Settings``
(names derived from the fields, their aliases and the env prefix) and validate there, the
commands must parse with the real ``service.cli.build_parser()``, and the images must install
torch first (worker) or not at all (api).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices, AliasPath

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

#: The services that run hmaopt (and so read its settings).
APP_SERVICES = ("migrate", "api", "worker")
#: Files the images need from the build context.
CONTEXT_NEEDS = ("pyproject.toml", "README.md", "service/cli/__init__.py", "workers/merge.py",
                 "migrations/env.py", "migrations/versions/0001_service_tables.py")


# ------------------------------------------------------------------------------- helpers

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_]\w*))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``$$``), recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("dollar"):
            return "$"
        name = m.group("name") or m.group("bare")
        current, op = env.get(name), m.group("op")
        if op == ":-" and not current or op == "-" and current is None:
            return m.group("arg")
        return current or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file as `docker compose up` sees it with no .env (the defaults)."""
    return interpolate(raw_compose, {})


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def setting_env_names() -> dict[str, str]:
    """Environment name -> Settings field, from the fields' validation aliases and the prefix."""
    config = Settings.model_config
    prefix = config.get("env_prefix", "")
    fold = (lambda s: s) if config.get("case_sensitive", False) else str.upper
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            choices = [alias]
        elif isinstance(alias, AliasPath):
            choices = [alias.path[0]]
        else:
            choices = [f"{prefix}{field}"]
        for choice in choices:
            names[fold(choice)] = field
    return names


def primary_env_name(field: str) -> str:
    """The name a deployment sets for a field: its first alias, else prefix + name."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return next(c for c in alias.choices if isinstance(c, str)).upper()
    if isinstance(alias, str):
        return alias.upper()
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def service_env(service: dict) -> dict[str, object]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def settings_for(env: dict[str, object], monkeypatch) -> Settings:
    """Settings() built from exactly this environment (the process's own settings cleared)."""
    known = setting_env_names()
    for name in list(os.environ):
        if name.upper() in known:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def command(service: dict) -> list[str]:
    cmd = service.get("command")
    assert cmd, "no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def hmaopt_services(services: dict) -> list[str]:
    """The services that run an hmaopt command (and so read its settings)."""
    return [name for name, svc in services.items()
            if svc.get("command") and command(svc)[0] == "hmaopt"]


def worker_services(services: dict) -> list[str]:
    return [name for name in hmaopt_services(services) if command(services[name])[1:2] == ["worker"]]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse_hmaopt(argv: list[str]) -> argparse.Namespace:
    """Parse an `hmaopt ...` command line with the real CLI parser."""
    from service.cli import build_parser

    assert argv[0] == "hmaopt", f"{argv}: not an hmaopt command"
    parser = build_parser()
    if argv[1] not in subcommands(parser):
        pytest.fail(f"`hmaopt {argv[1]}` is not a subcommand of service.cli.build_parser() "
                    f"(has: {sorted(subcommands(parser))})")
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(argv)}` does not parse with build_parser() (exit {exc.code})")


def mounts(service: dict) -> dict[str, tuple[str | None, bool]]:
    """Container path -> (source, read_only), from short or long volume syntax."""
    out = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) == 1:
                out[parts[0]] = (None, False)
            else:
                mode = parts[2] if len(parts) > 2 else "rw"
                out[parts[1]] = (parts[0], "ro" in mode.split(","))
        else:
            out[vol["target"]] = (vol.get("source"), bool(vol.get("read_only", False)))
    return out


def container_ports(service: dict) -> list[int]:
    """Container side of the published ports (short or long syntax)."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(int(port["target"]))
        else:
            out.append(int(str(port).split(":")[-1].split("/")[0]))
    return out


def published_ports(service: dict) -> list[str]:
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(str(port.get("published", "")))
        else:
            parts = str(port).split("/")[0].split(":")
            out.append(parts[-2] if len(parts) > 1 else "")
    return out


# ----------------------------------------------------------------------------- Dockerfile

class Stage:
    def __init__(self, name: str | None, image: str, parent: Stage | None):
        self.name, self.image, self.parent = name, image, parent
        self.instructions: list[tuple[str, str]] = []

    def chain(self) -> list[Stage]:
        return (self.parent.chain() if self.parent else []) + [self]

    def all_instructions(self) -> list[tuple[str, str]]:
        return [ins for stage in self.chain() for ins in stage.instructions]

    def base_image(self) -> str:
        return self.chain()[0].image


def _instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments (and parser directives), also inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = buf + stripped
        buf = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _arg_defaults(instructions, into: dict[str, str]) -> None:
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            into[name.strip()] = default.strip().strip('"')


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    """Stages by name (and by index), with ARG defaults substituted in FROM and RUN."""
    instructions = _instructions(path.read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    count = 0
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = interpolate(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            current = Stage(name, image, stages.get(image))
            stages[str(count)] = current  # FROM may name a stage by its index
            count += 1
            if name:
                stages[name] = current
        elif current is None:
            if keyword == "ARG":
                _arg_defaults([(keyword, rest)], global_args)
        else:
            current.instructions.append((keyword, rest))
    for stage in set(stages.values()):
        args = dict(global_args)
        for s in stage.chain():
            _arg_defaults(s.instructions, args)
        stage.instructions = [(k, interpolate(r, args) if k == "RUN" else r)
                              for k, r in stage.instructions]
    return stages


def build_of(compose_dir: Path, service: dict) -> tuple[Path, str | None]:
    build = service.get("build")
    assert build, "the service has no build section"
    if isinstance(build, str):
        return compose_dir / build / "Dockerfile", None
    context = compose_dir / build.get("context", ".")
    return context / build.get("dockerfile", "Dockerfile"), build.get("target")


@pytest.fixture(scope="module")
def targets(services) -> dict[str, Stage]:
    """Compose service -> the Dockerfile stage it builds."""
    out, parsed = {}, {}
    for name in APP_SERVICES:
        dockerfile, target = build_of(COMPOSE.parent, services[name])
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        stages = parsed.setdefault(dockerfile.resolve(), parse_dockerfile(dockerfile))
        assert target in stages, f"{name}: target {target!r} is not a stage of {dockerfile.name}"
        out[name] = stages[target]
    return out


_PIP_INSTALL = re.compile(r"\bpip3?\s+install\b|\bpython3?\s+-m\s+pip\s+install\b")


def pip_installs(stage: Stage) -> list[str]:
    return [rest for keyword, rest in stage.all_instructions()
            if keyword == "RUN" and _PIP_INSTALL.search(rest)]


def makefile_torch_pin() -> str:
    m = re.search(r"torch==([\w.+]+)", MAKEFILE.read_text())
    assert m, "no torch==<version> pin in the Makefile"
    return m.group(1)


# ------------------------------------------------------------------------------ compose

def test_compose_has_the_services(services):
    assert {"postgres", "redis", "migrate", "api", "scheduler", "worker"} <= set(services)


def test_every_interpolated_variable_has_a_default():
    # `docker compose up` without a .env must still give every setting a value.
    text = "\n".join(line.split(" #")[0] for line in COMPOSE.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    for m in _VAR.finditer(text):
        if m.group("dollar"):
            continue
        assert m.group("op") in (":-", "-"), f"{m.group(0)} in docker-compose.yml has no default"


def test_environment_names_are_settings(services):
    names = hmaopt_services(services)
    assert set(APP_SERVICES) <= set(names), f"hmaopt runs in {names}"
    known = setting_env_names()
    fold = (lambda s: s) if Settings.model_config.get("case_sensitive", False) else str.upper
    for name in names:
        env = service_env(services[name])
        assert env, f"{name} sets no environment"
        unknown = sorted(n for n in env if fold(n) not in known)
        assert not unknown, (f"{name}: {unknown} are not settings of service.settings.Settings "
                             f"(known: {sorted(known)})")
        for var, value in env.items():
            # Compose rejects booleans and passes a null through from the host: neither belongs.
            assert isinstance(value, (str, int, float)) and not isinstance(value, bool), (
                f"{name}: {var}={value!r} is not a string")


def test_app_services_share_their_settings(services, monkeypatch):
    # One anchor for all: the API judges worker liveness, queues and paths with the same
    # settings the workers use, and migrate upgrades the database the API reads.
    dumps = {}
    for name in hmaopt_services(services):
        with monkeypatch.context() as mp:
            dumps[name] = settings_for(service_env(services[name]), mp).model_dump()
    for name, dump in dumps.items():
        assert dump == dumps["api"], f"{name} and api have different settings"


def test_settings_point_at_the_compose_services(services, monkeypatch):
    s = settings_for(service_env(services["api"]), monkeypatch)
    assert not s.embedded_database
    url = urlsplit(s.database())
    assert s.database().startswith("postgresql+psycopg://"), s.database()
    assert url.hostname == "postgres" and url.hostname in services
    assert (url.port or 5432) == 5432
    pg = service_env(services["postgres"])
    assert url.username == pg["POSTGRES_USER"]
    assert url.password == pg["POSTGRES_PASSWORD"], "DATABASE_URL and POSTGRES_PASSWORD differ"
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]

    assert s.redis_url, "REDIS_URL is not set: `hmaopt serve` would start an embedded Valkey"
    redis = urlsplit(s.redis_url)
    assert redis.scheme == "redis"
    assert redis.hostname == "redis" and redis.hostname in services
    assert (redis.port or 6379) == 6379

    for path in [*s.model_roots, *s.data_roots, s.cache_dir]:
        assert path.is_absolute(), f"{path} is relative (to the container's working directory)"


def test_roots_are_mounted(compose, services, monkeypatch):
    s = settings_for(service_env(services["api"]), monkeypatch)
    api = mounts(services["api"])
    workers = {name: mounts(services[name]) for name in worker_services(services)}
    declared = set(compose.get("volumes") or {})
    for root in s.model_roots:
        assert str(root) in api and api[str(root)][1], f"api: model root {root} not mounted :ro"
        for name, m in workers.items():
            assert str(root) in m, f"{name}: model root {root} not mounted"
            assert not m[str(root)][1], f"{name}: model root {root} is read-only (exports)"
    for root in s.data_roots:
        for name, m in (("api", api), *workers.items()):
            assert str(root) in m and m[str(root)][1], f"{name}: data root {root} not mounted :ro"
    for name, m in workers.items():
        assert str(s.cache_dir) in m and not m[str(s.cache_dir)][1], (
            f"{name}: cache dir {s.cache_dir} is not a writable mount")
    for name, m in (("api", api), *workers.items()):
        for target, (source, _) in m.items():
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_backing_services_have_healthchecks(services):
    pg = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in (pg if isinstance(pg, str) else " ".join(pg))
    redis = services["redis"]["healthcheck"]["test"]
    assert "ping" in (redis if isinstance(redis, str) else " ".join(redis))
    assert "/var/lib/postgresql/data" in mounts(services["postgres"]), "pgdata is not mounted"


def test_migrate_runs_db_upgrade_once(services):
    migrate = services["migrate"]
    argv = command(migrate)
    assert argv == ["hmaopt", "db", "upgrade"]
    args = parse_hmaopt(argv)
    assert args.command == "db"
    assert migrate.get("restart", "no") in ("no", "on-failure"), "migrate must be one-shot"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_api_and_workers_wait_for_migrate_and_redis(services):
    for name in ["api", *worker_services(services)]:
        deps = services[name].get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", (
            f"{name} does not wait for migrate to complete successfully")
        assert deps.get("redis", {}).get("condition") == "service_healthy", (
            f"{name} does not wait for redis to be healthy")


def test_scheduler_runs_hmaopt_scheduler_with_writable_model_roots(services, monkeypatch):
    sched = services["scheduler"]
    assert parse_hmaopt(command(sched)).command == "scheduler"
    s = settings_for(service_env(sched), monkeypatch)
    m = mounts(sched)
    for root in s.model_roots:  # it switches the promote folders' aliases
        assert str(root) in m and not m[str(root)][1], f"model root {root} not writable"
    deps = sched.get("depends_on")
    assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_api_command_and_port(services):
    api = services["api"]
    args = parse_hmaopt(command(api))
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "the API must listen on all interfaces of its container"
    assert args.workers == 0, "the API container runs no local workers (--workers 0)"
    assert container_ports(api) == [args.port], (
        f"published {container_ports(api)} but `hmaopt serve --port {args.port}`")
    assert all(published_ports(api)), "the API port is not published on the host"


def test_workers_run_hmaopt_worker_on_their_gpu(services):
    names = worker_services(services)
    assert "worker" in names, f"the worker service does not run `hmaopt worker`: {names}"
    pinned = []
    for name in names:
        worker = services[name]
        args = parse_hmaopt(command(worker))
        assert args.command == "worker"
        m = re.fullmatch(r"cuda:(\d+)", args.device)
        assert m, f"{name}: --device {args.device}: a GPU worker runs on cuda:N"
        devices = (worker.get("deploy") or {}).get("resources", {}).get(
            "reservations", {}).get("devices", [])
        gpus = [d for d in devices
                if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        assert len(gpus) == 1, f"{name} reserves {len(gpus)} NVIDIA GPU entries, not one"
        ids = [str(i) for i in gpus[0].get("device_ids", [])]
        count = gpus[0].get("count", len(ids))
        assert count != "all" and int(count) == 1, (
            f"{name} reserves {count} GPUs: one worker per GPU (count: 1 or one device_id)")
        assert int(m.group(1)) < int(count), (
            f"{name}: --device {args.device} but the container sees {count} GPU(s)")
        assert not worker.get("ports"), f"{name}: a worker serves no port"
        pinned.append(ids)
    if len(names) > 1:  # several workers: each pinned to its own GPUs
        assert all(pinned), "with several workers, each needs device_ids (count: 1 is any GPU)"
        flat = [i for ids in pinned for i in ids]
        assert len(flat) == len(set(flat)), f"workers share GPUs: {dict(zip(names, pinned))}"


# ----------------------------------------------------------------------------- images

def test_api_image_is_slim_and_has_no_torch(targets):
    api = targets["api"]
    assert re.fullmatch(r"python:3\.11[\w.]*-slim[\w.-]*", api.base_image()), api.base_image()
    installs = pip_installs(api)
    assert any(re.search(r"install\s+(\.|/app)/?(\s|$)", r) for r in installs), (
        f"the api image does not `pip install .`: {installs}")
    for run in installs:
        assert "torch" not in run, f"the api image installs torch: {run}"
        assert "[worker" not in run and "worker]" not in run, f"the api image installs the worker extra: {run}"
    assert targets["migrate"] is api, "migrate should run the api image"


def test_worker_image_installs_torch_first(targets):
    installs = pip_installs(targets["worker"])
    torch = [i for i, r in enumerate(installs) if re.search(r"\btorch==", r)]
    package = [i for i, r in enumerate(installs) if re.search(r"\.\[[^\]]*\bworker\b", r)]
    assert torch, f"the worker image installs no pinned torch: {installs}"
    assert package, f"the worker image does not install .[worker]: {installs}"
    assert torch[0] < package[0], "the worker image installs the package before torch"
    pins = {m for r in installs for m in re.findall(r"\btorch==([\w.+]+)", r)}
    assert pins == {makefile_torch_pin()}, f"torch pins {pins} differ from the Makefile's"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_images_run_as_a_non_root_user(targets, name):
    users = [rest for keyword, rest in targets[name].all_instructions() if keyword == "USER"]
    assert users, f"the {name} image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"the {name} image runs as root"


def test_api_healthcheck_probes_healthz(targets, services):
    checks = [rest for keyword, rest in targets["api"].all_instructions()
              if keyword == "HEALTHCHECK"]
    assert checks and "NONE" not in checks[-1].upper(), "the api image has no HEALTHCHECK"
    check = checks[-1]
    assert "/healthz" in check and "urllib" in check, check
    assert "curl" not in check and "wget" not in check, "python:slim has neither curl nor wget"
    port = re.search(r"//(?:127\.0\.0\.1|localhost):(\d+)/healthz", check)
    # test_api_command_and_port ties the published port to `--port`.
    assert port and [int(port.group(1))] == container_ports(services["api"]), (
        "the HEALTHCHECK probes another port than the API's")
    worker_checks = [rest for keyword, rest in targets["worker"].all_instructions()
                     if keyword == "HEALTHCHECK"]
    assert not worker_checks or "NONE" in worker_checks[-1].upper(), (
        "the worker image inherits an HTTP HEALTHCHECK it cannot pass")
    assert services["migrate"].get("healthcheck", {}).get("disable") is True, (
        "migrate runs the api image: disable its HEALTHCHECK")


def test_dockerignore_keeps_the_package_and_drops_local_state():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").strip("/")
            if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
                   for p in prefixes):
                result = not negate
        return result

    for path in (".venv/bin/python", ".git/HEAD", "service/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path), f".dockerignore lets {path} into the build context"
    for path in CONTEXT_NEEDS:
        assert not ignored(path), f".dockerignore drops {path}, which the images need"


def test_pip_install_ships_the_migrations():
    # The images `pip install .` (not -e): `hmaopt db upgrade` finds the Alembic scripts
    # through `import migrations`, so the package must be in the wheel, not just in /app.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    for package in ("service", "workers", "migrations", "migrations.versions"):
        assert any(fnmatch.fnmatchcase(package, p) for p in include), (
            f"pyproject.toml [tool.setuptools.packages.find] include {include} leaves out "
            f"{package!r}: `pip install .` would not ship it")
        assert not any(fnmatch.fnmatchcase(package, p) for p in exclude), f"{package} excluded"
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), (
            f"{package} is not a package (no __init__.py)")


# -------------------------------------------------------------------------------- docs

def test_deployment_doc_lists_every_setting():
    doc = DEPLOYMENT_DOC.read_text()
    missing = [primary_env_name(f) for f in Settings.model_fields
               if primary_env_name(f) not in doc]
    assert not missing, f"docs/deployment.md does not describe {missing}"


def test_deployment_doc_token_commands_parse():
    doc = DEPLOYMENT_DOC.read_text()
    found = re.findall(r"docker compose exec (?:-\S+ )*api (hmaopt token [^`|)\n]*)", doc)
    assert found, "docs/deployment.md does not show how to create the first token"
    for line in found:
        args = parse_hmaopt(shlex.split(line))
        assert args.command == "token", line
    assert any(shlex.split(line)[2:] == ["create", "--role", "admin"] for line in found), (
        f"no `hmaopt token create --role admin` in docs/deployment.md: {found}")
