"""The bad-input catalogue: each case exits 2 with one line naming the culprit and writes nothing.

One row per case. Every case runs the real entry point (pretrain.main or
finetune.main, in this process) and asserts the exit code, that stderr is a
single ``further_pt: error: ...`` line containing the expected words, and that
the output dir was not created or changed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import pretrain_overrides

from further_pt.finetune import main as finetune_main
from further_pt.pretrain import main as pretrain_main


class Env:
    """Paths a case may use: a tmp dir, the shared corpus, tiny model and tokenizer."""

    def __init__(self, tmp: Path, corpus: Path, model_dir: Path, tokenizer) -> None:
        self.tmp, self.corpus, self.model_dir, self.tokenizer = tmp, corpus, model_dir, tokenizer
        self.out = tmp / "out"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def pretrain(self, **extra: object) -> list[str]:
        return pretrain_overrides(self.out, self.corpus, self.model_dir, self.tmp / "cache",
                                  **extra)

    def finetune(self, **extra: object) -> list[str]:
        if "data.train_file" not in extra:
            extra["data.train_file"] = self.labelled("train.jsonl", ["a", "b", "a", "b"])
        args = {"output_dir": self.out, "model.name_or_path": self.model_dir,
                "data.max_seq_length": 32, "data.head_tokens": 8, "train.epochs": 1,
                "train.batch_size": 2, **extra}
        return ["recipe=fit", *(f"{k}={v}" for k, v in args.items())]

    def labelled(self, name: str, labels: list[str]) -> Path:
        rows = [json.dumps({"text": f"text number {i}", "label": lab})
                for i, lab in enumerate(labels)]
        return self.file(name, "\n".join(rows) + "\n")


def _roberta(env: Env) -> Path:
    from transformers import RobertaConfig, RobertaForMaskedLM

    folder = env.tmp / "roberta"
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(env.tokenizer), hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def _big_tokenizer(env: Env) -> Path:
    from further_pt.model import train_wordpiece

    words = [f"word{i} token{i * 7} piece{i * 13}" for i in range(3000)]
    folder = env.tmp / "big-tokenizer"
    train_wordpiece(words, vocab_size=3000, lowercase=True, max_seq_length=64).save_pretrained(
        folder)
    return folder


def _other_run(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "train": {"lr": 0.1}}))
    return env.pretrain()


def _stranger_dir(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("my thesis")
    return env.pretrain()


def _out_is_file(env: Env) -> list[str]:
    env.out.write_text("not a folder")
    return env.pretrain()


def _csv_gz(env: Env) -> Path:
    path = env.tmp / "rows.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("body,label\nhello there,a\n")
    return path


P, F = "pretrain", "finetune"
Case = tuple[str, str, Callable[[Env], list[str]], str]
CASES: list[Case] = [
    ("missing file", P, lambda e: e.pretrain(**{"data.train_files": f"[{e.tmp}/nope.txt]"}),
     "'data.train_files[0]': no file matches"),
    ("empty file", P, lambda e: e.pretrain(**{"data.train_files": f"[{e.file('e.txt', '')}]"}),
     "e.txt is empty"),
    ("directory without files", P, lambda e: e.pretrain(**{
        "data.train_files": f"[{(e.tmp / 'empty').mkdir() or e.tmp / 'empty'}]"}),
     "no file matches"),
    ("glob matching nothing", P, lambda e: e.pretrain(**{"data.train_files": f"[{e.tmp}/*.md]"}),
     "no file matches"),
    ("binary file", P, lambda e: e.pretrain(**{"data.train_files": "[{}]".format(
        e.file("img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50))}), "looks binary"),
    ("a single 50 MB line", P, lambda e: e.pretrain(**{"data.train_files": "[{}]".format(
        e.file("huge.txt", "word " * 10_000_000 + "\n"))}),
     "document 1 (line 1 of a one-document-per-line file) is 50,000,000 characters long"),
    ("malformed jsonl line", P, lambda e: e.pretrain(**{"data.train_files": "[{}]".format(
        e.file("c.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n'))}), "c.jsonl line 3:"),
    ("csv without the text column", P, lambda e: e.pretrain(**{
        "data.train_files": f"[{_csv_gz(e)}]"}), "no column 'text' (columns: body, label)"),
    ("unknown recipe", P, lambda e: ["recipe=in_domian"], "unknown recipe 'in_domian'"),
    ("no recipe", P, lambda e: ["train.lr=1"], "no recipe given"),
    ("unknown key", P, lambda e: e.pretrain(**{"train.learning_rate": 1}),
     "unknown config key 'train.learning_rate'"),
    ("unknown key did-you-mean", P, lambda e: e.pretrain(**{"objective.masked_lm_probability": 1}),
     "(did you mean 'objective.masked_lm_prob'?)"),
    ("wrong type", P, lambda e: e.pretrain(**{"train.batch_size": "four"}),
     "config key 'train.batch_size'"),
    ("sequence longer than positions", P, lambda e: e.pretrain(**{"data.max_seq_length": 128}),
     "data.max_seq_length=128 exceeds the model's 64 position embeddings"),
    ("masked_lm_prob 0", P, lambda e: e.pretrain(**{"objective.masked_lm_prob": 0}),
     "'objective.masked_lm_prob': must be in (0, 1)"),
    ("masked_lm_prob above 1", P, lambda e: e.pretrain(**{"objective.masked_lm_prob": 1.5}),
     "'objective.masked_lm_prob': must be in (0, 1)"),
    ("batch size 0", P, lambda e: e.pretrain(**{"train.batch_size": 0}),
     "'train.batch_size': must be > 0"),
    ("negative steps", P, lambda e: e.pretrain(**{"train.max_steps": -5}),
     "'train.max_steps': must be > 0"),
    ("warmup beyond max_steps", P, lambda e: e.pretrain(**{"train.warmup_steps": 99}),
     "'train.warmup_steps': must be in [0, train.max_steps=6]"),
    ("NSP without an NSP head", P, lambda e: e.pretrain(**{"model.name_or_path": _roberta(e)}),
     "objective.nsp=true but 'roberta' models have no NSP head"),
    ("not a model", P, lambda e: e.pretrain(**{"model.name_or_path": e.tmp}),
     "is not a model folder or hub id"),
    ("tokenizer and model disagree", P, lambda e: e.pretrain(**{
        "model.tokenizer": _big_tokenizer(e)}), "tokenizer and model do not match"),
    ("output dir of another run", P, _other_run, "holds a run with a different config"),
    ("output dir with other files", P, _stranger_dir, "holds no further_pt run"),
    ("output dir is a file", P, _out_is_file, "is a file, not a folder"),
    ("model and from_scratch both", P, lambda e: ["recipe=demo", f"output_dir={e.out}",
                                                  f"model.name_or_path={e.model_dir}"],
     "give either model.name_or_path"),
    ("weights for the wrong number of sources", P, lambda e: e.pretrain(**{
        "data.source_weights": "[1,2]"}), "has 2 weights for 1 train_files"),
    ("bad txt layout", P, lambda e: e.pretrain(**{"data.txt_documents": "paragraph"}),
     "must be 'line' or 'blank_line'"),
    ("broken override syntax", P, lambda e: [*e.pretrain(), "train.lr=[1,"], "bad override"),
    ("fine-tuning recipe to pretrain", P, lambda e: ["recipe=fit"], "is not a pretrain recipe"),
    ("eval label unseen in train", F, lambda e: e.finetune(**{
        "data.eval_file": e.labelled("dev.jsonl", ["a", "b", "c"])}),
     "row 3 has label 'c', which the training data does not have (labels: a, b)"),
    ("single class", F, lambda e: e.finetune(**{
        "data.train_file": e.labelled("one.jsonl", ["a", "a", "a"])}), "has a single class ('a')"),
    ("labelled csv without text column", F, lambda e: e.finetune(**{
        "data.train_file": _csv_gz(e)}), "no column 'text' (columns: body, label)"),
    ("malformed labelled jsonl", F, lambda e: e.finetune(**{"data.train_file": e.file(
        "bad.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": \n')}),
     "bad.jsonl line 2:"),
    ("labelled .txt", F, lambda e: e.finetune(**{"data.train_file": e.file("t.txt", "hi\n")}),
     "labelled data must be .jsonl, .csv, .tsv or .parquet"),
    ("empty eval file", F, lambda e: e.finetune(**{"data.eval_file": e.file("dev.jsonl", "")}),
     "dev.jsonl is empty"),
    ("missing eval file", F, lambda e: e.finetune(**{"data.eval_file": e.tmp / "nope.jsonl"}),
     "'data.eval_file': file"),
    ("frozen encoder with unfreezing", F, lambda e: e.finetune(**{
        "train.freeze_encoder": "true", "train.unfreeze": "epoch"}),
     "conflicts with train.unfreeze"),
    ("head tokens beyond the sequence", F, lambda e: e.finetune(**{"data.head_tokens": 31}),
     "'data.head_tokens': must be in [0, max_seq_length - 2 = 30]"),
    ("unknown schedule", F, lambda e: e.finetune(**{"train.schedule": "cubic"}),
     "'train.schedule': must be one of stlr, linear, cosine, constant"),
    ("fine-tuning beyond positions", F, lambda e: e.finetune(**{"data.max_seq_length": 128,
                                                                "data.head_tokens": 8}),
     "data.max_seq_length=128 exceeds the model's 64 position embeddings"),
]


def _snapshot(path: Path) -> dict[str, bytes] | str | None:
    if not path.exists():
        return None
    if path.is_file():
        return path.read_text()
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("name", "entry", "make", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(name: str, entry: str, make, expected: str, tmp_path: Path,
                   corpus_file: Path, tiny_model_dir: Path, tokenizer,
                   capsys: pytest.CaptureFixture) -> None:
    env = Env(tmp_path, corpus_file, tiny_model_dir, tokenizer)
    argv = [str(a) for a in make(env)]
    before = _snapshot(env.out)
    capsys.readouterr()
    code = (pretrain_main if entry == P else finetune_main)(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    errors = [line for line in err if line.startswith("further_pt:")]
    assert len(errors) == 1 and errors[-1] == err[-1], err
    assert errors[0].startswith("further_pt: error: ")
    assert expected in errors[0]
    assert _snapshot(env.out) == before, "the output dir must not be touched"


def test_the_catalogue_is_long_enough() -> None:
    assert len(CASES) >= 30
