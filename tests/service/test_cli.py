from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.cli import parse_size


def hmaopt(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                          text=True, env=env)


def test_merge_end_to_end(tmp_path, llama_pair):
    base, aligned = llama_pair
    out = tmp_path / "merged"
    proc = hmaopt("merge", "--base", str(base), "--aligned", str(aligned), "--groups", "blocks:2",
                  "--ratios", "0.2,0.6", "--out", str(out), "--max-shard-size", "40KB")
    assert proc.returncode == 0, proc.stderr
    assert "block0=0.2, block1=0.6" in proc.stdout and str(out) in proc.stdout
    manifest = json.loads((out / "hma_manifest.json").read_text())
    assert manifest["ratios"] == {"block0": 0.2, "block1": 0.6}
    assert len(manifest["shards"]) > 1


@pytest.mark.parametrize("args,code,message", [
    (["--groups", "blocks:2", "--ratios", "0.2"], 2, "ratios: groups blocks:2 on 4 layers takes 2 ratio(s) (block0, block1), got 1"),
    (["--groups", "blocks:2", "--ratios", "0.2,1.3"], 2, "ratio for block1 is 1.3, outside [0.0, 1.0]"),
    (["--groups", "uniform", "--ratios", "abc"], 2, "ratios must be comma-separated numbers"),
    (["--groups", "blocks:9", "--ratios", "0.2"], 2, "k=9 blocks but the model has 4 layers"),
    (["--groups", "cubes", "--ratios", "0.2"], 2, "groups"),
    (["--groups", "uniform", "--ratios", "0.5", "--max-shard-size", "huge"], 2, "not a size"),
])
def test_bad_arguments_get_clear_errors(tmp_path, llama_pair, args, code, message):
    base, aligned = llama_pair
    proc = hmaopt("merge", "--base", str(base), "--aligned", str(aligned), "--out",
                  str(tmp_path / "o"), *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_extrapolation_must_be_asked_for(tmp_path, llama_pair):
    base, aligned = llama_pair
    proc = hmaopt("merge", "--base", str(base), "--aligned", str(aligned), "--groups", "uniform",
                  "--ratios", "1.2", "--out", str(tmp_path / "o"), "--allow-extrapolation")
    assert proc.returncode == 0, proc.stderr


def test_missing_files_and_pickle(tmp_path, llama_pair):
    base, _ = llama_pair
    proc = hmaopt("merge", "--base", str(base), "--aligned", str(tmp_path / "nowhere"),
                  "--ratios", "0.5", "--groups", "uniform", "--out", str(tmp_path / "o"))
    assert proc.returncode == 3 and "nowhere does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((base / "config.json").read_text())
    (pkl / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    proc = hmaopt("merge", "--base", str(base), "--aligned", str(pkl), "--ratios", "0.5",
                  "--groups", "uniform", "--out", str(tmp_path / "o"))
    assert proc.returncode == 7 and "pickle" in proc.stderr and "--allow-pickle" in proc.stderr


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(Exception):
        parse_size("-3MB")


def test_control_plane_imports_no_torch():
    code = "import sys, service.cli, service.spec, service.settings, service.errors; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_search_end_to_end_on_a_tiny_job(tmp_path):
    import yaml

    from tests.models import make_tiny_job

    spec = make_tiny_job(tmp_path)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "result.json"
    env = {**__import__("os").environ, "HMAOPT_CACHE_DIR": str(tmp_path / "cache")}
    proc = hmaopt("search", str(spec_file), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}",
                  "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["feasible"] and result["trials"]["finished"] == 6
    assert result["best"]["tax"] <= result["budget"]
    assert "best ratios     block0=" in proc.stdout
    assert f"gain            {result['gain']:+.4g}" in proc.stdout
    assert "θ_base figures measured" in proc.stderr


@pytest.mark.parametrize("edit,message", [
    ({"tax": {"budget": -1, "tasks": []}}, "tax.budget: Input should be greater than or equal to 0"),
    ({"search": {"sampler": "annealing"}}, "search.sampler: Input should be"),
    ({"reward": {"type": "reward_model"}}, "reward: reward type reward_model needs model"),
])
def test_search_spec_errors_name_the_field(tmp_path, edit, message):
    import yaml

    spec = {"name": "x", "base_model": "b", "aligned_model": "a",
            "reward": {"type": "preference", "data": "p.jsonl"},
            "tax": {"budget": 0.1, "tasks": [{"name": "t", "type": "perplexity", "data": "t.jsonl"}]}}
    spec.update(edit)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    proc = hmaopt("search", str(spec_file))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _leaves(parser, path=()):
    """(command path, parser) of every runnable `hmaopt ...` command, in --help order."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _leaves(child, (*path, name))
            return
    yield " ".join(path), parser


def test_the_parser_has_every_familys_commands():
    from service.cli import build_parser

    families = {name: p.get_default("handler").__module__.removeprefix("service.cli.")
                for name, p in _leaves(build_parser())}
    assert families == {
        "merge": "data", "search": "data", "world build": "data",
        "db upgrade": "admin", "db current": "admin",
        "token create": "admin", "token list": "admin", "token revoke": "admin",
        "serve": "stack", "worker": "stack", "scheduler": "stack", "demo": "stack",
        "submit": "remote", "pipeline create": "remote", "pipeline list": "remote",
        "pipeline trigger": "remote", "pipeline runs": "remote", "pipeline rollback": "remote",
        "jobs list": "jobs", "jobs show": "jobs", "jobs cancel": "jobs", "jobs export": "jobs",
        "jobs trials": "jobs",
    }
    # `hmaopt --help` lists them in this order, the families interleaved
    assert list(families)[8:14] == ["serve", "worker", "submit", "jobs list", "jobs show",
                                    "jobs cancel"]


def test_a_handlers_docstring_is_its_commands_description():
    from service.cli import build_parser
    from service.cli.data import search_command

    parsers = dict(_leaves(build_parser()))
    assert parsers["search"].description == search_command.__doc__
    assert parsers["db upgrade"].description is None  # no docstring, no description
    proc = hmaopt("search", "--help")
    assert proc.returncode == 0
    assert ("(2 invalid spec, 3 not found, 4 conflict, 7 checkpoint, 9 evaluation: the README's "
            "table)") in " ".join(proc.stdout.split())


def test_parsing_every_command_imports_no_data_plane():
    code = ("import sys; from service.cli import build_parser; p = build_parser();"
            "[p.parse_args(a.split()) for a in ('merge --base b --aligned a --ratios 0.5 --out o',"
            " 'search s.yaml', 'world build w', 'db current', 'token list', 'serve', 'worker',"
            " 'scheduler', 'demo', 'submit s.yaml', 'pipeline runs n', 'jobs list',"
            " 'jobs show j', 'jobs trials j --all', 'jobs export j --wait')];"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('torch', 'transformers', 'optuna', 'workers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_an_existing_out_and_an_out_of_bounds_ratio_name_their_flags(tmp_path, llama_pair):
    base, aligned = llama_pair
    out = tmp_path / "o"
    out.mkdir()
    args = ["merge", "--base", str(base), "--aligned", str(aligned), "--groups", "blocks:2",
            "--out", str(out)]
    proc = hmaopt(*args, "--ratios", "0.2,0.4")
    assert proc.returncode == 4 and "already exists" in proc.stderr
    assert "--overwrite" in proc.stderr and not any(out.iterdir())
    proc = hmaopt(*args, "--ratios", "0.2,1.3", "--overwrite", "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    error = json.loads(proc.stderr)
    assert error["exit_code"] == 2 and error["field"] == "ratios"
    assert "ratio for block1 is 1.3, outside [0.0, 1.0]" in error["message"]
    assert "pass --allow-extrapolation to go beyond" in error["message"]
    proc = hmaopt(*args, "--ratios", "0.2,0.4", "--overwrite", "--json")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout)
    assert merged["ratios"] == {"block0": 0.2, "block1": 0.4} and merged["out"] == str(out)
    assert merged["manifest"] == json.loads((out / "hma_manifest.json").read_text())


#: commands that print no data (they run until stopped): no --json
NO_DATA = {"serve", "worker", "scheduler"}


def test_every_command_that_prints_data_takes_json():
    from service.cli import build_parser

    for name, parser in _leaves(build_parser()):
        options = {o for a in parser._actions for o in a.option_strings}
        assert ("--json" in options) == (name not in NO_DATA), name


def test_the_readme_exit_code_table_is_the_error_trees():
    """README's table of exit codes lists exactly ExitCode, with each group's classes."""
    import re
    from pathlib import Path

    from service import errors

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = {int(m.group(1)): m.group(2) for m in
            re.finditer(r"^\| (\d+) \|(.*)\|$", section, re.MULTILINE)}
    assert sorted(rows) == sorted(int(c) for c in errors.ExitCode)
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.HmaoptError) and \
                cls.__name__ in readme:
            assert f"`{cls.__name__}`" in rows[int(cls.exit_code)], cls.__name__


def test_a_search_without_a_feasible_merge_exits_10(tmp_path):
    """Distinct from an invalid spec (2): the search ran, and --json still prints its result."""
    import yaml

    from service.cli.helpers import format_summary
    from tests.service.test_cli_remote import _noisy_aligned
    from tests.models import make_tiny_job

    spec = make_tiny_job(tmp_path)
    spec.update(aligned_model=_noisy_aligned(spec, tmp_path), ratio_bounds=[0.5, 1.0],
                tax={"budget": 0.0, "tasks": [t for t in spec["tax"]["tasks"]
                                              if t["type"] == "perplexity"]},
                search={**spec["search"], "n_trials": 3, "uniform_grid": [0.5, 1.0]})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**__import__("os").environ, "HMAOPT_CACHE_DIR": str(tmp_path / "cache")}
    proc = hmaopt("search", str(spec_file), "--json", "--no-progress", env=env)
    assert proc.returncode == 10, proc.stderr
    result = json.loads(proc.stdout)
    assert result["feasible"] is False and result["stages"]
    summary = format_summary(result)  # the text summary of the same result
    assert "no feasible merge: every trial's tax exceeds the budget" in summary
    assert "stages          no feasible answer; evaluations: uniform 2" in summary, summary
    error = json.loads(proc.stderr.strip().splitlines()[-1])
    assert error["error"] == "no_feasible_merge" and "raise tax.budget" in error["message"]


def test_admin_commands_print_json(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("HMAOPT_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'h.db'}", HMAOPT_HOME=str(tmp_path))
    proc = hmaopt("db", "current", "--json", env=env)
    assert proc.returncode == 6 and json.loads(proc.stdout)["revision"] is None
    assert "hmaopt db upgrade" in json.loads(proc.stderr)["message"]
    proc = hmaopt("db", "upgrade", "--json", env=env)
    head = json.loads(proc.stdout)["after"]
    assert proc.returncode == 0 and json.loads(proc.stdout)["before"] is None
    proc = hmaopt("db", "current", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["revision"] == head
    proc = hmaopt("token", "create", "--role", "viewer", "--name", "ci", "--json", env=env)
    created = json.loads(proc.stdout)
    assert created["role"] == "viewer" and created["token"].startswith("hmaopt_")
    proc = hmaopt("token", "revoke", created["id"], "--json", env=env)
    assert json.loads(proc.stdout)["revoked_at"]
    listed = json.loads(hmaopt("token", "list", "--json", env=env).stdout)
    assert [(t["name"], t["revoked_at"] is not None) for t in listed["data"]] == [("ci", True)]
    assert "token" not in listed["data"][0]
    proc = hmaopt("token", "revoke", "no-such-id", "--json", env=env)
    assert proc.returncode == 3 and json.loads(proc.stderr)["error"] == "not_found"
