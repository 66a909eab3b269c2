"""The further-pt command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from further_pt.cli import main


def test_recipes_lists_every_recipe(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert names == ["cross_domain", "demo", "feat", "fit", "in_domain", "multitask", "ulmfit",
                     "within_task"]
    assert any("IDPT" in line for line in out)


def test_config_prints_the_resolved_config(tmp_path: Path, corpus_file: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "recipe=in_domain", f"data.train_files=[{corpus_file}]",
                 "train.lr=1e-4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 1e-4 and cfg["data"]["train_files"] == [str(corpus_file)]


def test_config_errors_and_unknown_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "recipe=in_domain", "train.lr=1e-4"]) == 2
    assert "'data.train_files' is not set" in capsys.readouterr().err
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
