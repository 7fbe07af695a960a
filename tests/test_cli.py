"""The `mpft` command line: a fast parser, one convention for subcommands, and the checks every command shares."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import cli
from jobs.common import configured_tracking_uri
from jobs.gate import GateConfig
from jobs.promote_cmd import gate_from_args

REPO = Path(__file__).resolve().parents[1]


def test_building_the_parser_imports_neither_ray_nor_torch_nor_mlflow():
    # A fresh interpreter: in this one, other tests have imported them already.
    probe = ("import sys; from jobs.cli import build_parser; build_parser(); "
             "print(sorted({'ray', 'torch', 'mlflow'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_help_talks_to_users_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "mpft demo" in text
    assert all(name in text for name in cli.SUBCOMMANDS)


def test_a_missing_tracking_uri_is_one_line_naming_the_config_key(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match=r"^no MLflow tracking URI: set train\.tracking\.uri in the config or set "
                                         r"MLFLOW_TRACKING_URI$"):
        configured_tracking_uri(None, "train.tracking.uri")
    with socket.create_server(("127.0.0.1", 0)) as env_server, socket.create_server(("127.0.0.1", 0)) as other:
        from_env, configured = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in (env_server, other))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", from_env)
        assert configured_tracking_uri(None, "tracking.uri") == from_env
        assert configured_tracking_uri(configured, "tracking.uri") == configured


def test_promote_flags_override_only_the_gate_rules_they_name():
    args = cli.build_parser().parse_args(["promote", "--model", "m", "--holdout", "h.parquet", "--min-mean-acc", "0"])
    gate = gate_from_args(args)
    assert gate.min_mean_acc == 0.0  # given as 0: still given
    assert gate.model_dump(exclude={"min_mean_acc"}) == GateConfig().model_dump(exclude={"min_mean_acc"})


def test_render_fills_a_template_and_exits_2_naming_what_is_missing(tmp_path, capsys):
    template = tmp_path / "job.yaml"
    template.write_text("kind: RayJob\nimage: ${IMAGE}\nnamespace: ${NAMESPACE}\ncommand: echo $$HOME\n")
    out = tmp_path / "rendered.yaml"
    assert cli.main(["render", str(template), "IMAGE=img:1", "NAMESPACE=ns", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == {"kind": "RayJob", "image": "img:1", "namespace": "ns",
                                               "command": "echo $HOME"}
    assert cli.main(["render", str(template), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["IMAGE", "NAMESPACE"]
    assert cli.main(["render", str(template), "IMAGE=img:1"]) == 2
    assert "no value for NAMESPACE" in capsys.readouterr().err
    assert cli.main(["render", str(template), "IMAGE"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
