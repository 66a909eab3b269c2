"""The study's held-out in-domain text, its robust paired summaries and its steps curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import write_task

from further_pt.errors import ConfigError
from further_pt.study import experiment, heldout, paired, report


def _study(tmp_path: Path, *extra: str) -> tuple:
    """A task (24 texts), a selected corpus (5 documents) and an in-domain corpus of 75
    documents (and a blank line) that contains every task text and every selected one."""
    train = write_task(tmp_path / "train.jsonl", 24, 0)
    task_texts = [json.loads(x)["text"] for x in train.read_text().splitlines()]
    own = [f"domain document number {i} about packages" for i in range(51)]
    selected = tmp_path / "selected.txt"
    selected.write_text("\n".join(own[:5]) + "\n")
    domain = tmp_path / "domain.txt"
    lines = [*own[:26], *task_texts, "", *own[26:]]  # a blank line is not a document
    domain.write_text("\n".join(lines) + "\n")
    cfg = experiment.load([
        "recipe=paper_grid", f"output_dir={tmp_path / 'exp'}", f"task.train_file={train}",
        f"task.eval_file={train}", f"corpora.in_domain=[{domain}]",
        f"corpora.selected=[{selected}]", "forgetting.in_domain_docs=10",
        "variants=[fit,itpt,selected]", *extra])
    return cfg, set(task_texts), set(own[:5]), [x for x in lines if x]


def test_in_domain_heldout_is_text_no_variant_trains_on(tmp_path: Path) -> None:
    """10 documents drawn (seed 0) from the 46 that are neither task texts nor selected;
    IDPT/CDPT's corpus is the rest, in order; the draw is the same in another output_dir."""
    cfg, task, selected, docs = _study(tmp_path)
    files, held = heldout.split_in_domain(cfg, tmp_path / "a", pretrains_on_it=True)
    got = held.read_text().splitlines()
    assert len(got) == len(set(got)) == 10
    assert not set(got) & (task | selected) and set(got) <= set(docs)
    assert Path(files[0]).read_text().splitlines() == [x for x in docs if x not in set(got)]
    files_b, held_b = heldout.split_in_domain(cfg, tmp_path / "b", pretrains_on_it=False)
    assert held_b.read_text() == held.read_text()
    assert files_b == list(cfg.corpora.in_domain)  # no IDPT/CDPT: no copy of the corpus
    assert not (tmp_path / "b" / "data" / "in-domain-train.txt").exists()


def test_in_domain_heldout_matches_documents_however_they_are_written(tmp_path: Path) -> None:
    """CRLF line ends, other whitespace than `further-pt select` writes, and duplicates: a
    selected or task text is recognised, the train copy loses every copy of a held-out
    document, and the held-out documents are distinct."""
    train = write_task(tmp_path / "train.jsonl", 4, 0)
    task = [json.loads(x)["text"] for x in train.read_text().splitlines()]
    own = [f"doc {i}  with\ttabs" for i in range(30)]
    selected = tmp_path / "selected.txt"
    selected.write_text("doc 0 with tabs\ndoc 1 with tabs\n")  # as select writes them
    domain = tmp_path / "domain.txt"
    domain.write_bytes("".join(f"{x}\r\n" for x in [*own, *own[2:12], *task]).encode())
    cfg = experiment.load([
        "recipe=paper_grid", f"output_dir={tmp_path / 'exp'}", f"task.train_file={train}",
        f"task.eval_file={train}", f"corpora.in_domain=[{domain}]", "variants=[fit,idpt]",
        f"corpora.selected=[{selected}]", "forgetting.in_domain_docs=12"])
    files, held = heldout.split_in_domain(cfg, tmp_path / "a", pretrains_on_it=True)
    got = held.read_text().splitlines()
    assert len(got) == len(set(got)) == 12
    assert not {"doc 0 with tabs", "doc 1 with tabs"} & set(got)
    assert not {" ".join(t.split()) for t in task} & set(got)
    kept = Path(files[0]).read_text().splitlines()
    assert not {" ".join(x.split()) for x in kept} & set(got)
    assert len(kept) == 30 + 10 + 4 - sum(1 + (2 <= int(x.split()[1]) < 12) for x in got)


def test_in_domain_heldout_refuses_what_it_cannot_hold_out(tmp_path: Path) -> None:
    cfg, *_ = _study(tmp_path, "forgetting.in_domain_docs=23")  # 46 eligible: not > 2 x 23
    with pytest.raises(ConfigError, match=r"46 documents that no variant trains on.*"
                       r"forgetting.in_domain_docs=23"):
        heldout.split_in_domain(cfg, tmp_path / "x", pretrains_on_it=True)
    cfg, *_ = _study(tmp_path, "corpora.in_domain=[hf:some/corpus]")
    with pytest.raises(ConfigError, match=r"'corpora.in_domain': hf:some/corpus is not a local"):
        heldout.split_in_domain(cfg, tmp_path / "y", pretrains_on_it=False)
    cfg, *_ = _study(tmp_path, "corpora.in_domain=[" + str(tmp_path / "train.jsonl") + "]")
    with pytest.raises(ConfigError, match=r"train.jsonl is not a local text file"):
        heldout.check(cfg)
    cfg, *_ = _study(tmp_path, "forgetting.in_domain_docs=-1")
    with pytest.raises(ConfigError, match=r"'forgetting.in_domain_docs': must be >= 0, got -1"):
        heldout.check(cfg)
    cfg, *_ = _study(tmp_path, "forgetting.in_domain_docs=0")
    assert heldout.split_in_domain(cfg, tmp_path / "z", pretrains_on_it=True)[1] is None


def test_robust_paired_summaries_are_their_formulas() -> None:
    """One unstable seed (seed 4, -7.1 points) carries the mean; the median and the mean
    without it say so."""
    diffs = [-0.004, 0.002, -0.006, -0.071, -0.003, 0.001, -0.005, -0.002]
    got = paired.robust(diffs, list(range(1, 9)))
    assert got["extreme_seed"] == 4
    assert got["median_diff"] == pytest.approx((-0.004 + -0.003) / 2)
    others = diffs[:3] + diffs[4:]
    assert got["mean_diff_without_extreme"] == pytest.approx(sum(others) / 7)
    assert paired.robust([0.01, -0.02], [1, 2])["mean_diff_without_extreme"] is None
    itpt = {s: 0.3 + d for s, d in zip(range(1, 9), diffs, strict=True)}
    rows = paired.paired_rows({(400, "fit"): dict.fromkeys(range(1, 9), 0.3), (400, "itpt"): itpt},
                              {400: ["fit", "itpt"]}, str)
    text = paired.markdown(rows, str)
    assert "| itpt | 400 | 8 | -1.10 |" in text and "| -0.35 | -0.24 (seed 4) |" in text


def test_steps_curve_lists_each_length_of_pretraining(tmp_path: Path) -> None:
    """ITPT at 1,200 and 4,000 steps (an ablation changing only the length): one row per
    length, in order, with the paired gain and the held-out in-domain loss (perplexity); an
    ablation changing anything else is not a point of the curve."""
    cfg, *_ = _study(tmp_path, "variants=[fit,itpt]", "train_sizes=[400]",
                     "ablations=[{name: itpt_4000, variant: itpt, overrides: "
                     "['train.max_steps=4000', 'train.warmup_steps=400']}, {name: itpt_lr, "
                     "variant: itpt, overrides: ['train.lr=1e-3']}]")
    table = [{"key": k, "variant": n, "train_size": 400, "train_examples": 400,
              "pretrain_max_steps": s, "in_domain_mlm_loss": loss, "in_domain_na": False,
              "in_domain_perplexity": heldout.perplexity(loss)}
             for k, n, s, loss in [("fit", "BERT-FiT", None, None),
                                   ("itpt_4000", "BERT-ITPT-FiT (itpt_4000)", 4000, 3.5),
                                   ("itpt", "BERT-ITPT-FiT", 1200, 4.0),
                                   ("itpt_lr", "BERT-ITPT-FiT (itpt_lr)", 1200, 3.9)]]
    pairs = [{"key": k, "train_size": 400, "mean_diff": m, "ci_low": m - 0.01,
              "ci_high": m + 0.01, "wins": w, "seeds": 20, "median_diff": m / 2}
             for k, m, w in [("itpt", -0.012, 13), ("itpt_4000", -0.02, 15),
                             ("itpt_lr", -0.03, 16)]]
    text = report.steps_markdown(cfg, pairs, table)
    lines = [x for x in text.splitlines() if x.startswith("| BERT-ITPT")]
    assert lines == [
        f"| BERT-ITPT-FiT | 400 | 1200 | -1.20 | [-2.20, -0.20] | 13/20 | -0.60 | "
        f"4.000 ({math.exp(4.0):.1f}) |",
        f"| BERT-ITPT-FiT (itpt_4000) | 400 | 4000 | -2.00 | [-3.00, -1.00] | 15/20 | -1.00 | "
        f"3.500 ({math.exp(3.5):.1f}) |"]
    header = next(x for x in text.splitlines() if x.startswith("| model"))
    assert header.count("|") == lines[0].count("|") == 9
    same_length = [*table[:2], {**table[2], "pretrain_max_steps": 4000}]
    assert report.steps_markdown(cfg, pairs, same_length) == ""  # no curve: one length


def test_with_cdpt_the_in_domain_sample_leaves_the_general_corpus_too(tmp_path: Path) -> None:
    """CDPT trains on the general corpus as well: held-out in-domain documents found there
    are taken out of it (the last forgetting.docs stay held out as before); without CDPT the
    general corpus is only split."""
    *_, docs = _study(tmp_path)
    general = tmp_path / "general.txt"  # other text with the whole in-domain corpus inside
    other = [f"general text {i}" for i in range(40)]
    general.write_text("\n".join([*other[:20], *docs, *other[20:]]) + "\n")
    cfg, *_ = _study(tmp_path, "variants=[fit,cdpt]", "forgetting.docs=5",
                     f"corpora.cross_domain=[{general}]")
    _, held = heldout.split_in_domain(cfg, tmp_path / "a", pretrains_on_it=True)
    files, general_held = heldout.split_general(cfg, tmp_path / "a", exclude=held)
    gone = set(held.read_text().splitlines())
    kept = Path(files[0]).read_text().splitlines()
    assert general_held.read_text().splitlines() == other[-5:]
    assert kept == [x for x in [*other[:20], *docs, *other[20:35]] if x not in gone]
    files, _ = heldout.split_general(cfg, tmp_path / "b")
    assert Path(files[0]).read_text().splitlines() == [*other[:20], *docs, *other[20:35]]


def test_task_texts_and_the_within_task_corpus_are_never_held_out(tmp_path: Path) -> None:
    """A within-task corpus (text lines here) is excluded beside the labelled training file."""
    own_task = tmp_path / "within.txt"
    own_task.write_text("domain document number 30 about packages\n")
    cfg, *_ = _study(tmp_path, f"corpora.within_task=[{own_task}]",
                     "forgetting.in_domain_docs=23")
    with pytest.raises(ConfigError, match=r"has 45 documents that no variant trains on"):
        heldout.split_in_domain(cfg, tmp_path / "a", pretrains_on_it=False)  # 46 without it


def test_pretraining_evaluates_on_the_sample_unless_the_overrides_choose_their_own(
        tmp_path: Path) -> None:
    cfg, *_ = _study(tmp_path, "pretrain.overrides=['train.max_steps=4']")
    held = tmp_path / "held.txt"
    assert heldout.pretrain_overrides(cfg, held) == [f"data.eval_files=[{held}]",
                                                     "train.max_steps=4"]
    assert heldout.pretrain_overrides(cfg, None) == ["train.max_steps=4"]
    for own in ("data.eval_fraction=0.05", "data.eval_files=[x.txt]"):
        cfg, *_ = _study(tmp_path, f"pretrain.overrides=['{own}']")
        assert heldout.pretrain_overrides(cfg, held) == [own]
    cfg, *_ = _study(tmp_path, "variants=[fit,itpt]", "ablations=[{name: a, variant: itpt, "
                     "overrides: ['data.eval_fraction=0.1']}]")
    assert heldout.pretrain_overrides(cfg, held) == []


def test_blank_line_documents_cannot_be_held_out(tmp_path: Path) -> None:
    cfg, *_ = _study(tmp_path, "pretrain.overrides=['data.txt_documents=blank_line']")
    with pytest.raises(ConfigError, match=r"'pretrain.overrides': data.txt_documents=blank_line"):
        heldout.check(cfg)
