"""The further-pt command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from further_pt.cli.main import main


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
    assert main(["config", "--check", "recipe=in_domain", "train.lr=1e-4"]) == 2
    assert "'data.train_files' is not set" in capsys.readouterr().err
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


NOT_SET = "# <- not set: required before a run"


def test_config_prints_a_recipe_before_there_is_data(capsys: pytest.CaptureFixture) -> None:
    """The first command a new user runs: the composed recipe, its unset key marked, exit 0."""
    assert main(["config", "recipe=fit"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[:3] == [
        "# recipe fit (finetune): composed with its bases and overrides; values checked,",
        "# files not opened (a run opens them, as does `further-pt config --check ...`)",
        "# not set (marked below), required before a run: data.train_file",
    ]
    assert lines[3].startswith("output_dir: runs/fit  # ")  # each key with what it does
    assert lines[4].startswith("overwrite_output_dir: false  # ")
    assert [line for line in lines if NOT_SET in line] == [f"  train_file: ???  {NOT_SET}"]
    cfg = yaml.safe_load(captured.out)  # still YAML: the marks are comments
    assert cfg["train"]["lr"] == 2e-5 and cfg["data"]["train_file"] == "???"
    assert captured.err.strip().endswith("recipe=fit data.train_file=...")


def test_config_marks_the_corpus_of_a_pretraining_recipe(capsys) -> None:
    assert main(["config", "recipe=in_domain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "# not set (marked below), required before a run: data.train_files"
    assert f"  train_files: ???  {NOT_SET}" in lines


def test_config_marks_a_null_that_a_run_refuses(capsys) -> None:
    """multitask leaves data.train_file null for its tasks list: one of the two is needed."""
    assert main(["config", "recipe=multitask"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  train_file: null  {NOT_SET} (or tasks)" in lines


def test_config_check_refuses_what_a_run_refuses(tmp_path: Path, capsys) -> None:
    assert main(["config", "--check", "recipe=fit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["further_pt: error: config key 'data.train_file' is not set "
                   "(the recipe must give it)"]
    missing = tmp_path / "train.jsonl"
    assert main(["config", "recipe=fit", f"data.train_file={missing}"]) == 0  # files: not opened
    assert NOT_SET not in capsys.readouterr().out
    assert main(["config", "--check", "recipe=fit", f"data.train_file={missing}"]) == 2
    assert f"'data.train_file': file {missing} does not exist" in capsys.readouterr().err
    missing.write_text('{"text": "a", "label": "x"}\n')
    assert main(["config", "--check", "recipe=fit", f"data.train_file={missing}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train_file"] == str(missing)


def test_config_checks_values_while_a_key_is_unset(capsys) -> None:
    """A bad value is still refused, and a derived one shown, before the data is named."""
    assert main(["config", "recipe=fit", "train.lr=-1"]) == 2
    assert "config key 'train.lr': must be > 0, got -1.0" in capsys.readouterr().err
    assert main(["config", "recipe=in_domain", "train.max_steps=30"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["warmup_steps"] == 3 and cfg["data"]["train_files"] == "???"


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


VERBS = ["recipes", "config", "prepare", "pretrain", "finetune", "predict", "experiment",
         "plot-schedule", "plot-run", "select", "doctor"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_answers_help(verb: str, capsys: pytest.CaptureFixture) -> None:
    """Each verb's --help says what it takes and exits 0, before any recipe is read (today
    `further-pt pretrain --help` exited 2 with "no recipe given")."""
    for flag in ("--help", "-h"):
        assert main([verb, flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith(("usage: further-pt " + verb, "Further pretraining",
                               "Fine-tuning")), out[:200]
        assert f"further-pt {verb}" in out


def test_job_help_lists_the_recipes_of_its_kind(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    shipped = out.split("Shipped recipes:")[1].split("\n\n")[0].split()
    assert [w for w in shipped if w in ("within_task", "in_domain", "cross_domain", "demo",
                                        "fit")] == ["cross_domain", "demo", "in_domain",
                                                    "within_task"]
    assert "accelerate launch -m further_pt.pretrain" in out  # what works from an install


@pytest.mark.slow
def test_the_entry_scripts_run_as_modules(tmp_path: Path) -> None:
    """`python -m further_pt.pretrain` / `.finetune` (what an install has; the file path exists
    only in a checkout) answer --help, and a bad recipe is the usual one-line exit 2."""
    import subprocess
    import sys

    for job in ("pretrain", "finetune"):
        proc = subprocess.run([sys.executable, "-m", f"further_pt.{job}", "--help"],
                              capture_output=True, text=True, cwd=tmp_path, check=False)
        assert proc.returncode == 0 and "Shipped recipes:" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "further_pt.pretrain", "recipe=nope"],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("further_pt: error:"), proc.stderr


def test_config_shows_what_each_key_does(capsys: pytest.CaptureFixture) -> None:
    """Each key's line carries its comment: the recipe's own where it sets the key (why),
    else its base's (what the key does); a key's meaning is found without the docs."""
    assert main(["config", "recipe=demo"]) == 0
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()
             if ":" in line and not line.startswith("#")}
    assert lines["seed"].endswith("# seeds the model init, data order, masking and dropout")
    assert lines["masked_lm_prob"].startswith("  masked_lm_prob: 0.15  # ")  # from the base
    demo = (Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml").read_text()
    own = next(line for line in demo.splitlines() if line.strip().startswith("max_steps:"))
    assert lines["max_steps"].endswith("# " + " ".join(own.split("#", 1)[1].split()))
