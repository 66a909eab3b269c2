"""Recipes compose, validate, and fail with one line naming the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from further_pt.cli.show_config import recipe_kind
from further_pt.config import recipes, validate
from further_pt.config.recipes import ConfigError
from further_pt.pretrain import load, main

PAPER = {"model.name_or_path": "bert-base-uncased", "train.max_steps": 100000,
         "train.batch_size": 32, "data.max_seq_length": 128, "train.lr": 5e-5,
         "train.warmup_steps": 10000, "objective.masked_lm_prob": 0.15,
         "objective.max_predictions_per_seq": 20, "objective.nsp": True,
         "checkpoint.every_steps": 10000}


@pytest.mark.parametrize("recipe", ["within_task", "in_domain", "cross_domain"])
def test_paper_recipes_carry_the_paper_defaults(recipe: str, corpus_file: Path) -> None:
    cfg = load([f"recipe={recipe}", f"data.train_files=[{corpus_file}]"])
    flat = recipes.flatten(recipes.OmegaConf.to_container(cfg))
    assert {k: flat[k] for k in PAPER} == PAPER


def test_every_shipped_recipe_is_complete_for_the_schema() -> None:
    names = [n for n in recipes.available_recipes() if recipe_kind(n) == "pretrain"]
    assert names == ["cross_domain", "demo", "in_domain", "within_task"]
    for name in names:
        cfg = recipes.compose(name, [])
        if recipes.OmegaConf.is_missing(cfg.data, "train_files"):  # the user names the corpus
            with pytest.raises(ConfigError, match=r"'data\.train_files' is not set"):
                recipes.apply_schema(cfg, recipes.PretrainSchema)
            cfg.data.train_files = ["corpus.txt"]
        recipes.apply_schema(cfg, recipes.PretrainSchema)


def test_corpus_recipes_are_thin_compositions_of_one_base() -> None:
    """ITPT/IDPT/CDPT differ from the base only in output_dir: nothing is copied."""
    base = recipes.flatten(recipes.OmegaConf.to_container(recipes.compose("in_domain", [])))
    for name in ("within_task", "cross_domain"):
        other = recipes.flatten(recipes.OmegaConf.to_container(recipes.compose(name, [])))
        assert {k for k in base if base[k] != other[k]} == {"output_dir"}
    for name in ("within_task", "in_domain", "cross_domain"):
        text = (recipes.recipes_dir() / f"{name}.yaml").read_text()
        assert "base/pretrain@_here_" in text and len(text.splitlines()) < 12


def test_glob_override_and_weights(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt.gz"):
        (tmp_path / name).write_text("x\n")
    files = f"data.train_files=[{tmp_path}/*.txt,{tmp_path}/c.txt.gz]"
    cfg = load(["recipe=cross_domain", files, "data.source_weights=[1,3]",
                "train.max_steps=70000"])
    assert list(cfg.data.train_files) == [f"{tmp_path}/*.txt", f"{tmp_path}/c.txt.gz"]
    assert validate.expand_paths(cfg.data.train_files[0]) == [str(tmp_path / "a.txt"),
                                                              str(tmp_path / "b.txt")]
    assert list(cfg.data.source_weights) == [1.0, 3.0] and cfg.train.max_steps == 70000


def test_recipe_from_a_file_path_composes_the_shipped_base(tmp_path: Path,
                                                           corpus_file: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - base/pretrain@_here_\n  - _self_\n"
                      "output_dir: runs/mine\nseed: 7\ntrain:\n  lr: 1.0e-4\n")
    cfg = load([f"recipe={recipe}", f"data.train_files=[{corpus_file}]"])
    assert (cfg.seed, cfg.train.lr, cfg.train.max_steps) == (7, 1e-4, 100000)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_step=5",
         "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        ("train.max_steps=-3", "config key 'train.max_steps': must be > 0, got -3"),
        ("objective.masked_lm_prob=1.5",
         "config key 'objective.masked_lm_prob': must be in (0, 1)"),
        ("train.batch_size=0", "config key 'train.batch_size': must be > 0, got 0"),
        ("train.batch_size=many", "config key 'train.batch_size'"),
        ("data.train_files=[/nonexistent/*.txt]",
         "config key 'data.train_files[0]': no file matches '/nonexistent/*.txt'"),
        ("data.source_weights=[1,2]", "config key 'data.source_weights': has 2 weights for 1"),
        ("train.warmup_steps=-1", "config key 'train.warmup_steps': must be >= 0, got -1"),
        ("train.short_run_warmup_ratio=1",
         "config key 'train.short_run_warmup_ratio': must be in [0, 1), got 1.0"),
        ("model.from_scratch.hidden_size=101", "is not a multiple of num_attention_heads"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str, corpus_file: Path) -> None:
    recipe = "demo" if override.startswith("model.from_scratch") else "in_domain"
    argv = [f"recipe={recipe}", f"data.train_files=[{corpus_file}]", override]
    with pytest.raises(ConfigError) as err:
        load(argv)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_recipe_suggests_a_name() -> None:
    with pytest.raises(ConfigError,
                       match=r"unknown recipe 'in_domian' \(did you mean 'in_domain'\?\)"):
        load(["recipe=in_domian"])


def test_missing_recipe_argument_lists_recipes() -> None:
    with pytest.raises(ConfigError, match=r"no recipe given: add recipe=NAME .*demo"):
        load(["train.max_steps=3"])


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, corpus_file: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["recipe=in_domain", f"output_dir={out}", f"data.train_files=[{corpus_file}]",
                 "objective.masked_lm_prob=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["further_pt: error: config key 'objective.masked_lm_prob': must be in (0, 1), "
                   "got 0.0"]
    assert not out.exists()


def test_a_refused_run_releases_its_output_dir_lock(tmp_path: Path, corpus_file: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """In one process (tests, notebooks, launcher [inprocess]) a refusal must not keep the lock."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    argv = ["recipe=in_domain", f"output_dir={out}", f"data.train_files=[{corpus_file}]"]
    for _ in range(2):
        assert main(argv) == 2
        assert "holds no further_pt run" in capsys.readouterr().err


WARMUP_LINE = ("train.warmup_steps=100 is longer than the run (train.max_steps=30): warming up "
               "over 3 steps instead (train.short_run_warmup_ratio=0.1 of max_steps)")


def test_a_shortened_demo_runs_with_a_fitted_warmup(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """`pretrain recipe=demo train.max_steps=30`: a run (warm-up 3 of 30), with one log line."""
    with caplog.at_level("INFO", logger="further_pt"):
        cfg = load(["recipe=demo", f"output_dir={tmp_path / 'out'}", "train.max_steps=30"])
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (30, 3)
    assert [r.getMessage() for r in caplog.records if "warm" in r.getMessage()] == [WARMUP_LINE]


@pytest.mark.parametrize(("recipe", "max_steps", "warmup"), [
    ("in_domain", 30, 3), ("in_domain", 9999, 1000), ("in_domain", 10000, 10000),
    ("in_domain", 100000, 10000), ("demo", 1000, 100), ("demo", 100, 100), ("demo", 99, 10),
    ("demo", 4, 0)])
def test_only_a_warmup_longer_than_the_run_changes(recipe: str, max_steps: int, warmup: int,
                                                   corpus_file: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="further_pt"):
        cfg = load([f"recipe={recipe}", f"data.train_files=[{corpus_file}]",
                    f"train.max_steps={max_steps}"])
    assert cfg.train.warmup_steps == warmup
    logged = [r for r in caplog.records if "is longer than the run" in r.getMessage()]
    assert len(logged) == (max_steps < {"in_domain": 10000, "demo": 100}[recipe])


def test_fit_warmup_is_its_formula() -> None:
    assert validate.fit_warmup(100, 30, 0.1) == 3  # round(0.1 * 30)
    assert validate.fit_warmup(10000, 1234, 0.1) == 123
    assert validate.fit_warmup(50, 50, 0.1) == 50  # a warm-up as long as the run is kept
    assert validate.fit_warmup(7, 5, 0.0) == 0
