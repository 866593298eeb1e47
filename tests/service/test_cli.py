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
    }
    # `hmaopt --help` lists them in this order, the families interleaved
    assert list(families)[8:12] == ["serve", "worker", "submit", "scheduler"]


def test_a_handlers_docstring_is_its_commands_description():
    from service.cli import build_parser
    from service.cli.data import search_command

    parsers = dict(_leaves(build_parser()))
    assert parsers["search"].description == search_command.__doc__
    assert parsers["db upgrade"].description is None  # no docstring, no description
    proc = hmaopt("search", "--help")
    assert proc.returncode == 0
    assert "(3 not found, 4 conflict, 7 checkpoint, 9 evaluation)" in " ".join(proc.stdout.split())


def test_parsing_every_command_imports_no_data_plane():
    code = ("import sys; from service.cli import build_parser; p = build_parser();"
            "[p.parse_args(a.split()) for a in ('merge --base b --aligned a --ratios 0.5 --out o',"
            " 'search s.yaml', 'world build w', 'db current', 'token list', 'serve', 'worker',"
            " 'scheduler', 'demo', 'submit s.yaml', 'pipeline runs n')];"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('torch', 'transformers', 'optuna', 'workers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_a_pipeline_run_that_no_scheduler_advances_times_out(monkeypatch, capsys):
    import argparse

    from service.cli import remote

    class Server:
        def request(self, method, path, **_):
            return {"id": "r1", "status": "pending"}

    monkeypatch.setattr(remote, "_client", lambda args: Server())
    args = argparse.Namespace(name="nightly", wait=True, timeout=-1.0)
    assert remote.pipeline_trigger_command(args) == 1
    err = capsys.readouterr().err
    assert ("hmaopt: error: run r1 still pending after -1 s (is a scheduler running? "
            "`hmaopt scheduler`, or the embedded `hmaopt serve`)") in err
