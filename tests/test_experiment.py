"""The experiment chain end to end (tiny model, 2-3 variants x 2 sizes x 2 seeds), its report."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import shutil
import sys

import pytest
import yaml
from helpers import write_task

from further_pt.cli.main import main

# The linear reference joins the grid where its optional extra is installed.
VARIANTS = ["fit", "itpt", *(["linear"] if importlib.util.find_spec("sklearn") else [])]
SIZES = [("n8", 8), ("all", 64)]  # stage tag, examples used (train.jsonl has 64 rows)


def _overrides(stage: str, *items: str) -> str:
    """A list of overrides as one Hydra value: each item quoted (they contain '=')."""
    return f"{stage}.overrides=[{','.join(repr(i) for i in items)}]"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_model_dir, corpus_file):
    base = tmp_path_factory.mktemp("experiment")
    train, dev = write_task(base / "train.jsonl", 64, 0), write_task(base / "dev.jsonl", 20, 1)
    out = base / "exp"
    domain = base / "domain.txt"  # in-domain text: no IDPT here, so only its held-out sample
    domain.write_text("".join(f"{line}\n" for line in corpus_file.read_text().splitlines()[:60]))
    argv = ["experiment", "recipe=paper_grid", f"output_dir={out}", "seeds=[1,2]",
            f"variants=[{','.join(VARIANTS)}]", "train_sizes=[8,null]",
            f"base_model={tiny_model_dir}", f"task.train_file={train}",
            f"task.eval_file={dev}", f"corpora.cross_domain=[{corpus_file}]",
            f"corpora.in_domain=[{domain}]", "forgetting.in_domain_docs=12",
            "forgetting.docs=40", "forgetting.max_seq_length=64", "launcher=[inprocess]",
            _overrides("pretrain", "train.max_steps=4", "train.warmup_steps=1",
                       "train.batch_size=4", "data.max_seq_length=64", "checkpoint.every_steps=4",
                       "model.attn_implementation=eager"),
            _overrides("finetune", "data.max_seq_length=32", "data.head_tokens=8",
                       "train.epochs=2", "train.batch_size=16", "train.lr=3e-3",
                       "train.head_lr=3e-3", "model.attn_implementation=eager")]
    assert main(argv) == 0
    return out, argv


def _csv(out) -> list[dict[str, str]]:
    with open(out / "report.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_report_has_one_row_per_variant_and_size(experiment) -> None:
    out, _ = experiment
    table = _csv(out)
    names = {"fit": "BERT-FiT", "itpt": "BERT-ITPT-FiT", "linear": "TF-IDF + LogReg"}
    assert [(r["variant"], r["train_size"], r["train_examples"]) for r in table] == [
        (names[v], tag.removeprefix("n"), str(n)) for tag, n in SIZES for v in VARIANTS]
    assert all(r["seeds"] == "2" for r in table)
    for tag, _ in SIZES:
        fit, itpt = (next(r for r in table if r["key"] == k and r["train_size"] ==
                          tag.removeprefix("n")) for k in ("fit", "itpt"))
        assert float(fit["relative_error_reduction"]) == 0.0
        errs = [json.loads((out / f"finetune-itpt-{tag}-seed{s}" / "metrics.json").read_text())[
            "eval_error_rate"] for s in (1, 2)]
        assert float(itpt["error_rate_mean"]) == pytest.approx(sum(errs) / 2)
        assert itpt["pretrain_steps"] == "4" and float(itpt["pretrain_seconds"]) > 0
        assert float(fit["forgetting_mlm_loss"]) > 0 and float(itpt["forgetting_mlm_loss"]) > 0
    report = (out / "report.md").read_text()
    assert "| BERT-ITPT-FiT | 8 |" in report and "error_rates.png" in report
    assert (out / "error_rates.png").stat().st_size > 1000
    assert (out / "pretraining_mlm_loss.png").is_file()
    held = (out / "data" / "general-heldout.txt").read_text().splitlines()
    assert len(held) == 40


def test_held_out_in_domain_loss_per_variant(experiment) -> None:
    """Each encoder's MLM loss on the 12 held-out in-domain documents is measured, reported
    with its perplexity, and every pretraining run evaluates on them as it trains."""
    from further_pt.objectives.evaluation import mlm_loss

    out, argv = experiment
    held = (out / "data" / "in-domain-heldout.txt").read_text().splitlines()
    losses = json.loads((out / "heldout_in_domain.json").read_text())
    assert len(held) == 12 and set(losses) == {"fit", "itpt"}
    base = next(a.split("=", 1)[1] for a in argv if a.startswith("base_model="))
    assert losses["fit"] == pytest.approx(mlm_loss(base, held, max_seq_length=64, seed=0))
    itpt = next(r for r in _csv(out) if r["key"] == "itpt")
    assert itpt["pretrain_max_steps"] == "4"  # the run's train.max_steps, read from its config
    assert float(itpt["in_domain_mlm_loss"]) == pytest.approx(losses["itpt"])
    assert float(itpt["in_domain_perplexity"]) == pytest.approx(math.exp(losses["itpt"]))
    assert f"{losses['itpt']:.3f} ({math.exp(losses['itpt']):.1f}) |" in (
        out / "report.md").read_text()
    log = [json.loads(x) for x in (out / "pretrain-itpt" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    assert [x["step"] for x in log if "eval_loss" in x] == [4]  # at the end (every 1000 steps)


def test_pretraining_is_shared_by_every_size(experiment) -> None:
    out, _ = experiment
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"pretrain-itpt"} | {f"finetune-{v}-{tag}-seed{s}" for v in VARIANTS
                                               for tag, _ in SIZES for s in (1, 2)}
    assert [p.name for p in out.glob("pretrain-*")] == ["pretrain-itpt"]
    log = [json.loads(x) for x in (out / "pretrain-itpt" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    steps = [x["step"] for x in log if "train/mlm_loss" in x]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one run: no step logged twice
    for variant in ("fit", "itpt"):  # 2 epochs, batch 16: 8 examples -> 1 step, 64 -> 4
        steps = {tag: json.loads((out / f"finetune-{variant}-{tag}-seed1" / "metrics.json")
                                 .read_text())["steps"] for tag, _ in SIZES}
        assert steps == {"n8": 2, "all": 8}


def test_data_size_view(experiment) -> None:
    out, _ = experiment
    report = (out / "report.md").read_text()
    view = report[report.index("## Training-set size"):]
    assert "| model | 8 | all (64) |" in view
    fit = [r for r in _csv(out) if r["key"] == "fit"]
    cells = " | ".join(f"{100 * float(r['error_rate_mean']):.2f} +- "
                       f"{100 * float(r['error_rate_sd']):.2f} (n=2)" for r in fit)
    assert f"| BERT-FiT | {cells} |" in view
    assert "when Welch's t-test over the per-seed error rates gives p < 0.05" in view
    assert view.count("\n- ") == 2 and "- all (64) examples: " in view
    assert "![data_size](data_size.png)" in view
    assert (out / "data_size.png").stat().st_size > 1000


def test_linear_reference_row(experiment) -> None:
    pytest.importorskip("sklearn")
    from further_pt.data.targets import stratified_subsample
    from further_pt.study import linear

    out, _ = experiment
    m = {(tag, s): json.loads((out / f"finetune-linear-{tag}-seed{s}" / "metrics.json")
                              .read_text()) for tag, _ in SIZES for s in (1, 2)}
    assert [m[tag, 1]["train_examples"] for tag, _ in SIZES] == [8, 64]
    assert set(m["all", 1]) >= {"eval_accuracy", "eval_error_rate", "eval_macro_f1",
                                "eval_per_class_f1", "eval_confusion_matrix"}
    assert m["all", 1]["eval_error_rate"] == m["all", 2]["eval_error_rate"] <= 0.1  # separable
    row = next(r for r in _csv(out) if r["key"] == "linear" and r["train_size"] == "all")
    assert float(row["error_rate_sd"]) == 0.0 and row["pretrain_steps"] == ""
    _, labels, names = linear.read_train(
        str(out.parent / "train.jsonl"), "text", "label")
    assert names == ["fruit", "motor"]
    rows = linear.sample_rows(labels, 8, 1, num_classes=2, where="t")
    assert rows == stratified_subsample(labels, 8, 1, num_classes=2, where="t")
    assert sorted(labels[r] for r in rows) == [0] * 4 + [1] * 4


def test_an_experiment_started_before_the_in_domain_sample_keeps_running_without_it(
        experiment, tmp_path) -> None:
    """An output_dir whose experiment.yaml predates forgetting.in_domain_docs: its finished
    stages may have trained on any in-domain document, so a rerun (twice) adds no held-out
    in-domain column and is not refused as a changed config."""
    out, argv = experiment
    old = tmp_path / "old"
    shutil.copytree(out, old)
    saved = yaml.safe_load((old / "experiment.yaml").read_text())
    del saved["forgetting"]["in_domain_docs"]
    saved["output_dir"] = str(old)
    (old / "experiment.yaml").write_text(yaml.safe_dump(saved))
    (old / "heldout_in_domain.json").unlink()
    rerun = [a if not a.startswith("output_dir=") else f"output_dir={old}" for a in argv]
    for _ in range(2):
        assert main(rerun) == 0
        assert "in_domain_docs" not in yaml.safe_load(
            (old / "experiment.yaml").read_text())["forgetting"]
        assert not (old / "heldout_in_domain.json").exists()
        assert "held-out in-domain" not in (old / "report.md").read_text()


def test_rerun_does_no_work(experiment, caplog) -> None:
    out, argv = experiment
    before = (out / "stages.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in [*out.rglob("metrics.json"),
                                                *(out / "pretrain-itpt" / "final").iterdir()]}
    with caplog.at_level(logging.INFO, logger="further_pt.study.experiment"):
        assert main(argv) == 0
    assert (out / "stages.json").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 1 + len(VARIANTS) * 2 * 2  # pretrain-itpt + variants x sizes x seeds


def test_a_changed_stage_config_is_refused_but_the_grid_may_grow(experiment, capsys) -> None:
    out, argv = experiment
    changed = [a if not a.startswith("forgetting.docs=") else "forgetting.docs=30" for a in argv]
    assert main(changed) == 2
    assert "holds an experiment with a different config" in capsys.readouterr().err
    saved = (out / "experiment.yaml").read_text()
    sub = {"train_sizes=[8,null]": "train_sizes=[8]", "seeds=[1,2]": "seeds=[1]"}
    assert main([sub.get(a, a) for a in argv]) == 0  # a sub-grid: every stage skipped
    assert (out / "experiment.yaml").read_text() != saved
    assert main(argv) == 0  # back to the full grid, still nothing to run


def test_experiment_validation_names_the_key(tmp_path, capsys) -> None:
    assert main(["experiment", "recipe=paper_grid", "task.train_file=nope.jsonl",
                 "task.eval_file=nope.jsonl"]) == 2
    assert "config key 'task.train_file': file nope.jsonl does not exist" in (
        capsys.readouterr().err)


@pytest.mark.parametrize(("sizes", "message"), [
    ("[400,null,400]", "config key 'train_sizes': 400 is listed twice"),
    ("[null,null]", "config key 'train_sizes': null is listed twice"),
    ("[0]", "config key 'train_sizes': 0 is not a positive number of examples"),
    ("[]", "config key 'train_sizes': give at least one size"),
    ("[1000]", "config key 'train_sizes': 1000 exceeds the 64 rows of"),
    ("[1]", "config key 'train_sizes': 1 is below the 2 classes of"),
])
def test_train_sizes_are_checked_before_any_stage(tmp_path, tiny_model_dir, capsys, sizes,
                                                  message) -> None:
    train, dev = write_task(tmp_path / "t.jsonl", 64, 0), write_task(tmp_path / "d.jsonl", 8, 1)
    assert main(["experiment", "recipe=paper_grid", f"output_dir={tmp_path / 'exp'}",
                 f"train_sizes={sizes}", "variants=[fit]", f"base_model={tiny_model_dir}",
                 f"task.train_file={train}", f"task.eval_file={dev}", "launcher=[python]",
                 "forgetting.docs=0"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp" / "stages.json").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("ablations=[{name:itpt,variant:itpt,overrides:[]}]",
     "config key 'ablations[0].name': 'itpt' must be lowercase letters, digits and _, and not"),
    ("ablations=[{name:no_warmup,variant:fit,overrides:[]}]",
     "config key 'ablations[0].variant': must be one of itpt, idpt, cdpt, selected, got 'fit'"),
    ("ablations=[{name:no_warmup,variant:idpt,overrides:[]}]",
     "config key 'ablations[0].variant': idpt is not in variants"),
    ("ablations=[{name:a,variant:itpt,overrides:[]},{name:a,variant:itpt,overrides:[]}]",
     "config key 'ablations[1].name': 'a' is listed twice"),
    ("finetune.by_size=[{size:400,overrides:['train.epochs=9']}]",
     "config key 'finetune.by_size[0].size': 400 is not one of train_sizes"),
    ("ablations=[{name:a,variant:itpt,overrides:[],train_sizes:[400]}]",
     "config key 'ablations[0].train_sizes': 400 is not one of train_sizes"),
])
def test_ablations_and_size_overrides_are_checked(tmp_path, tiny_model_dir, capsys, override,
                                                  message) -> None:
    train, dev = write_task(tmp_path / "t.jsonl", 64, 0), write_task(tmp_path / "d.jsonl", 8, 1)
    assert main(["experiment", "recipe=paper_grid", f"output_dir={tmp_path / 'exp'}",
                 "variants=[fit,itpt]", f"base_model={tiny_model_dir}", override,
                 f"task.train_file={train}", f"task.eval_file={dev}", "launcher=[python]",
                 "forgetting.docs=0"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_linear_without_sklearn_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    train = write_task(tmp_path / "t.jsonl", 8, 0)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec -> None: "not installed"
    assert main(["experiment", "recipe=paper_grid", "variants=[fit,linear]",
                 f"task.train_file={train}", f"task.eval_file={train}"]) == 2
    assert "variant 'linear' needs scikit-learn, which is not installed: pip install " \
           "further-pt[linear]" in capsys.readouterr().err


@pytest.mark.smoke
def test_plot_schedule_shows_the_slanted_triangle(tmp_path, capsys) -> None:
    from omegaconf import OmegaConf

    from further_pt.config import recipes
    from further_pt.study.plots import schedule_curves

    cfg = recipes.compose("ulmfit", [])
    curves = schedule_curves(cfg, layers=4, steps=1000)
    head = curves["head"]
    assert head[0] == pytest.approx(5e-5 / 32) and max(head) == pytest.approx(5e-5)
    assert head.index(max(head)) == 100  # cut = 0.1 * T
    assert curves["layer_3"][0] == 0.0 and curves["layer_3"][60] > 0  # unfrozen at step 50
    assert curves["layer_2"][60] == 0.0  # still frozen: one group per 50 steps
    assert curves["layer_2"][110] == pytest.approx(curves["layer_3"][110] * 0.3846)
    assert curves["embeddings"][-1] > 0  # all groups unfrozen by the end
    out = tmp_path / "ulmfit.png"
    assert main(["plot-schedule", "recipe=ulmfit", "steps=400", "layers=4",
                 f"output={out}"]) == 0
    assert out.stat().st_size > 1000
    assert OmegaConf.select(cfg, "train.schedule") == "stlr"


def test_plot_run(experiment, tmp_path) -> None:
    out, _ = experiment
    for run in ("pretrain-itpt", "finetune-fit-n8-seed1"):
        png = tmp_path / f"{run}.png"
        assert main(["plot-run", str(out / run), f"output={png}"]) == 0
        assert png.stat().st_size > 1000
    assert main(["plot-run", str(tmp_path)]) == 2


@pytest.mark.slow
def test_a_killed_stage_resumes_and_finished_ones_are_kept(tmp_path, tiny_model_dir,
                                                           corpus_file, monkeypatch,
                                                           capsys) -> None:
    train, dev = write_task(tmp_path / "t.jsonl", 48, 0), write_task(tmp_path / "d.jsonl", 16, 1)
    out = tmp_path / "exp"
    argv = ["experiment", "recipe=paper_grid", f"output_dir={out}", "seeds=[1]",
            "variants=[fit,itpt]", f"base_model={tiny_model_dir}", f"task.train_file={train}",
            f"task.eval_file={dev}", "forgetting.docs=0", "launcher=[python]",
            _overrides("pretrain", "train.max_steps=4", "train.warmup_steps=1",
                       "train.batch_size=4", "data.max_seq_length=64", "checkpoint.every_steps=2",
                       "train.log_every_steps=1", "model.attn_implementation=eager"),
            _overrides("finetune", "data.max_seq_length=32", "data.head_tokens=8",
                       "train.epochs=1", "train.batch_size=16", "model.attn_implementation=eager"),
            "finetune.by_size=[{size:null,overrides:['train.epochs=2']}]"]
    monkeypatch.setenv("FURTHER_PT_FAULT", "step:3")  # pretrain-itpt dies after step 3
    assert main(argv) == 3
    assert "stage pretrain-itpt failed (exit -9)" in capsys.readouterr().err
    assert (out / "pretrain-itpt" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.delenv("FURTHER_PT_FAULT")
    assert main([*argv, "launcher=[inprocess]"]) == 0  # the launcher may change on a rerun
    stages = json.loads((out / "stages.json").read_text())
    assert all(s["finished"] for s in stages.values())
    log = [json.loads(x) for x in (out / "pretrain-itpt" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]  # killed after 3, resumed from 2: once each
    assert (out / "report.csv").is_file()
    fit = json.loads((out / "finetune-fit-all-seed1" / "metrics.json").read_text())
    assert fit["steps"] == 2 * 3  # by_size: 2 epochs of ceil(48 / 16) steps


@pytest.mark.slow
def test_an_ablation_can_be_limited_to_some_sizes(experiment, tmp_path) -> None:
    src, argv = experiment
    out = tmp_path / "exp"
    shutil.copytree(src, out)  # a copy, so the module's experiment stays as the others expect
    saved = out / "experiment.yaml"
    saved.write_text(saved.read_text().replace(str(src), str(out)))
    argv = [f"output_dir={out}" if a.startswith("output_dir=") else a for a in argv]
    before = json.loads((out / "stages.json").read_text())
    # An ablation added later runs its own pretraining and fine-tunes only (the grid may grow).
    assert main([*argv, "ablations=[{name:itpt_lr,variant:itpt,overrides:['train.lr=1e-4'],"
                        "train_sizes:[8]}]"]) == 0
    after = json.loads((out / "stages.json").read_text())
    assert set(after) - set(before) == {"pretrain-itpt_lr", "finetune-itpt_lr-n8-seed1",
                                        "finetune-itpt_lr-n8-seed2"}  # not at 'all'
    assert after["pretrain-itpt"] == before["pretrain-itpt"]  # not re-run
    config = yaml.safe_load((out / "pretrain-itpt_lr" / "config.yaml").read_text())
    assert config["train"]["lr"] == 1e-4
    rows = [(r["key"], r["train_size"]) for r in _csv(out) if r["key"] == "itpt_lr"]
    assert rows == [("itpt_lr", "8")]
    view = (out / "report.md").read_text().split("## Training-set size")[1]
    row = next(line for line in view.splitlines() if line.startswith("| BERT-ITPT-FiT (itpt_lr)"))
    assert row.endswith(" | not run |") and row.count("(n=2)") == 1  # 8: run; all: not run


def test_paired_report_against_fit(experiment) -> None:
    """The report pairs every row with BERT-FiT at the same seed (same subsample): per-seed
    differences, their mean, a 95% t interval, paired t and Wilcoxon p-values."""
    import scipy.stats as scipy_stats

    out, _ = experiment
    with open(out / "paired.csv") as fh:
        rows = {(r["train_size"], r["key"]): r for r in csv.DictReader(fh)}
    for tag, _ in SIZES:
        size = tag.removeprefix("n")
        err = {(v, s): json.loads((out / f"finetune-{v}-{tag}-seed{s}" / "metrics.json")
                                  .read_text())["eval_error_rate"] for v in ("fit", "itpt")
               for s in (1, 2)}
        diffs = [err["itpt", s] - err["fit", s] for s in (1, 2)]
        row = rows[size, "itpt"]
        assert row["seeds"] == "2" and row["variant"] == "BERT-ITPT-FiT"
        assert [float(d) for d in row["diffs"].split(";")] == pytest.approx(diffs)
        assert float(row["mean_diff"]) == pytest.approx(sum(diffs) / 2)
        if diffs[0] != diffs[1]:
            half = scipy_stats.t.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5
            assert float(row["ci_high"]) - float(row["ci_low"]) == pytest.approx(2 * half)
    report = (out / "report.md").read_text()
    section = report[report.index("## Paired against BERT-FiT"):]
    assert "| model | training examples | seeds | mean difference | 95% interval |" in section
    assert "| BERT-ITPT-FiT | 8 | 2 |" in section


def test_paired_summary_is_its_formula() -> None:
    import scipy.stats as stats

    from further_pt.study.paired import summarise

    diffs = [-0.02, -0.01, -0.03, 0.0, -0.02, -0.015, -0.025, -0.005]
    got = summarise(diffs)
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
    assert got["mean_diff"] == pytest.approx(mean)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert got["p_t"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert got["p_wilcoxon"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert 0 < got["p_t"] < 0.01 and got["p_wilcoxon"] < 0.05
    same = summarise([0.01, 0.01, 0.01])  # no spread: t undefined, Wilcoxon still defined
    assert same["p_t"] is None and same["p_wilcoxon"] is not None


def test_forgetting_is_not_applicable_without_an_mlm_head(tmp_path, tiny_model_dir) -> None:
    """A head-less base (sentence-transformers style) would score a random MLM head."""
    from transformers import AutoModel, AutoTokenizer

    from further_pt.objectives.evaluation import mlm_loss

    texts = ["the quick brown fox jumps over the lazy dog " * 4] * 8
    assert mlm_loss(tiny_model_dir, texts, max_seq_length=32, seed=0) > 0
    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(bare)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bare)
    assert mlm_loss(bare, texts, max_seq_length=32, seed=0) is None


def test_a_report_without_scipy_fails_loudly(monkeypatch) -> None:
    """scipy is declared (pyproject); were it missing, the paired report says so in one line
    rather than leaving its intervals and tests out."""
    from further_pt.errors import SetupError
    from further_pt.study.paired import summarise

    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(SetupError, match=r"need scipy .*pip install scipy"):
        summarise([-0.02, -0.01, 0.0])
    assert summarise([-0.02])["ci_low"] is None  # one seed: nothing to test, nothing needed


def test_scipy_is_a_declared_dependency() -> None:
    """It arrived only through scikit-learn (the `linear` extra) before."""
    from importlib.metadata import requires

    assert any(r.startswith("scipy>=") and "extra" not in r for r in requires("further-pt"))
