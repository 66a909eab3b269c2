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
    assert names == ["cross_domain", "demo", "feat", "fit", "in_domain", "multitask",
                     "paper_grid", "ulmfit", "within_task"]
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


def test_config_picks_the_schema_of_the_recipe(tmp_path: Path, capsys) -> None:
    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n')
    assert main(["config", "recipe=ulmfit", f"data.train_file={train}"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["schedule"] == "stlr" and cfg["train"]["stlr_ratio"] == 32
    assert main(["config", "recipe=fit", f"data.train_file={train}", "train.schedule=cubic"]) == 2
    assert "config key 'train.schedule': must be one of stlr, linear, cosine, constant" in (
        capsys.readouterr().err)


def test_a_finetune_recipe_given_to_pretrain_is_named(capsys) -> None:
    from further_pt.pretrain import main as pretrain_main

    assert pretrain_main(["recipe=fit"]) == 2
    assert "recipe 'fit' is not a pretrain recipe" in capsys.readouterr().err
