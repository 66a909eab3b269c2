"""The bad-input catalogue: each case exits 2 with one line naming the culprit and writes nothing.

One row per case. Every case runs the real entry point (pretrain.main or
finetune.main, in this process) and asserts the exit code, that stderr is a
single ``further_pt: error: ...`` line containing the expected words, and that
the output dir was not created or changed.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import pretrain_overrides

from further_pt.cli.main import main as cli_main
from further_pt.finetune import main as finetune_main
from further_pt.pretrain import main as pretrain_main


class Env:
    """Paths a case may use: a tmp dir, the shared corpus, tiny model and tokenizer, and (built
    on first use) a model fine-tuned from the tiny one, for ``further-pt predict``."""

    def __init__(self, tmp: Path, corpus: Path, model_dir: Path, tokenizer,
                 finetuned: Callable[[], Path]) -> None:
        self.tmp, self.corpus, self.model_dir, self.tokenizer = tmp, corpus, model_dir, tokenizer
        self.out = tmp / "out"
        self._finetuned = finetuned

    @property
    def finetuned(self) -> Path:
        return self._finetuned()

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

    def predict(self, input_path: Path, model: Path | None = None) -> list[str]:
        """``further-pt predict`` arguments; the output goes under ``out``, which must stay
        absent."""
        return [f"model={model or self.finetuned}", f"input={input_path}",
                f"output={self.out / 'predictions.jsonl'}"]

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
    from further_pt.data.tokenizer import train_wordpiece

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


def _rows(env: Env, name: str, *rows: dict) -> Path:
    """A .jsonl file of the given objects, one a line (line N = rows[N - 1])."""
    return env.file(name, "".join(json.dumps(row) + "\n" for row in rows))


def _ok(i: int) -> dict:
    return {"text": f"a good text {i}", "label": "ab"[i % 2]}


def _bad_train(env: Env, bad: dict, **extra: object) -> list[str]:
    """Fine-tuning on a training file whose line 3 is ``bad`` (lines 1, 2, 4 are fine)."""
    path = _rows(env, "train_bad.jsonl", _ok(0), _ok(1), bad, _ok(3))
    return env.finetune(**{"data.train_file": path, **extra})


def _kind_train(env: Env, kind: str, *labels: object, **extra: object) -> list[str]:
    """Fine-tuning a ``task.kind`` on train_kind.jsonl, whose line N has label ``labels[N-1]``."""
    path = _rows(env, "train_kind.jsonl", *({"text": f"text number {i}", "label": label}
                                            for i, label in enumerate(labels)))
    return env.finetune(**{"data.train_file": path, "task.kind": kind, **extra})


def _wordlevel(env: Env, **special: str) -> Path:
    """A fast tokenizer with no word boundaries (WordLevel on whitespace) and given specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["alpha beta gamma delta epsilon"] * 3, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    folder = env.tmp / "wordlevel"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special).save_pretrained(
        folder)
    return folder


def _damaged(env: Env, folder: Path, name: str, content: bytes | None = None) -> Path:
    """A copy of a model folder whose file ``name`` is cut to half (an interrupted copy), or
    replaced by ``content``."""
    copy = env.tmp / "damaged"
    shutil.copytree(folder, copy)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[:len(data) // 2] if content is None else content)
    return copy


def _tasks(env: Env, *names: str) -> list[str]:
    train = env.labelled("train.jsonl", ["a", "b", "a", "b"])
    tasks = ",".join(f"{{name:{n},train_file:{train},eval_file:null,text_column:text,"
                     "label_column:label}" for n in names)
    return ["recipe=multitask", f"output_dir={env.out}", f"model.name_or_path={env.model_dir}",
            "data.max_seq_length=32", f"tasks=[{tasks}]"]


EXTEND = "{max_new_tokens:10,min_frequency:2}"
P, F, PREDICT = "pretrain", "finetune", "predict"
ENTRY = {P: pretrain_main, F: finetune_main, PREDICT: lambda argv: cli_main(["predict", *argv])}
CUT = "model.safetensors is cut short ("
NOT_JSON = "tokenizer.json is not valid JSON ("
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
    ("eval_fraction 0", P, lambda e: e.pretrain(**{"data.eval_fraction": 0}),
     "'data.eval_fraction': must be between 0 and 1 (a share of the documents), got 0"),
    ("eval_fraction 1", P, lambda e: e.pretrain(**{"data.eval_fraction": 1}),
     "'data.eval_fraction': must be between 0 and 1 (a share of the documents), got 1"),
    ("eval_files and eval_fraction", P, lambda e: e.pretrain(**{
        "data.eval_fraction": 0.1, "data.eval_files": f"[{e.corpus}]"}),
     "give data.eval_files (held-out documents) or data.eval_fraction"),
    ("eval_files matching nothing", P, lambda e: e.pretrain(**{
        "data.eval_files": f"[{e.tmp}/held/*.txt]"}), "'data.eval_files[0]': no file matches"),
    ("eval every 0 steps", P, lambda e: e.pretrain(**{"data.eval_fraction": 0.1,
                                                       "eval.every_steps": 0}),
     "'eval.every_steps': must be >= 1, got 0"),
    ("keep_best_by without a held-out set", P, lambda e: e.pretrain(**{
        "checkpoint.keep_best_by": "eval_loss"}),
     "'checkpoint.keep_best_by': needs a held-out set: set data.eval_files or data.eval_fraction"),
    ("keep_best_by an unknown metric", P, lambda e: e.pretrain(**{
        "data.eval_fraction": 0.1, "checkpoint.keep_best_by": "eval_accuracy"}),
     "'checkpoint.keep_best_by': must be null or eval_loss; got 'eval_accuracy'"),
    ("eval_fraction leaving nothing to train on", P, lambda e: e.pretrain(**{
        "data.train_files": "[{}]".format(e.file("two.txt", "one document\nand another\n")),
        "data.eval_fraction": 0.9}), "too few to hold some out and train on the rest"),
    ("streaming with NSP", P, lambda e: e.pretrain(**{"data.streaming": "true"}),
     "'objective.nsp': NSP pairs need whole documents to draw random-next sentences from"),
    ("streaming with eval_fraction", P, lambda e: e.pretrain(**{
        "data.streaming": "true", "objective.nsp": "false", "data.eval_fraction": 0.1}),
     "'data.eval_fraction': a share of a stream cannot be held out"),
    ("streaming without checkpoint steps", P, lambda e: e.pretrain(**{
        "data.streaming": "true", "objective.nsp": "false", "checkpoint.every_steps": "null"}),
     "'checkpoint.every_steps': must be a number of steps: a stream has no epochs"),
    ("a streamed source without its text column", P, lambda e: e.pretrain(**{
        "data.streaming": "true", "objective.nsp": "false",
        "data.train_files": "[{{hf: json, data_files: [{}]}}]".format(e.file(
            "rows.jsonl", '{"body": "some text here"}\n'))}),
     "has no column 'text' (its columns: body); set data.text_column"),
    ("a dataset mapping with an unknown key", P, lambda e: e.pretrain(**{
        "data.train_files": "[{hf: json, files: [x.jsonl]}]"}),
     "'data.train_files[0].files': not a key of a dataset source"),
    ("hub id with a space", P, lambda e: e.pretrain(**{"hub.model_id": "'me/my model'"}),
     "'hub.model_id': 'me/my model' is not a Hub repository id (user/name)"),
    ("hub strategy unknown", F, lambda e: e.finetune(**{"hub.strategy": "hourly"}),
     "'hub.strategy': must be end or every_checkpoint; got 'hourly'"),
    ("masked_lm_prob 0", P, lambda e: e.pretrain(**{"objective.masked_lm_prob": 0}),
     "'objective.masked_lm_prob': must be in (0, 1)"),
    ("masked_lm_prob above 1", P, lambda e: e.pretrain(**{"objective.masked_lm_prob": 1.5}),
     "'objective.masked_lm_prob': must be in (0, 1)"),
    ("batch size 0", P, lambda e: e.pretrain(**{"train.batch_size": 0}),
     "'train.batch_size': must be > 0"),
    ("collective timeout 0", F, lambda e: e.finetune(**{"train.collective_timeout_s": 0}),
     "'train.collective_timeout_s': must be > 0 seconds, got 0"),
    ("negative steps", P, lambda e: e.pretrain(**{"train.max_steps": -5}),
     "'train.max_steps': must be > 0"),
    ("negative warmup", P, lambda e: e.pretrain(**{"train.warmup_steps": -1}),
     "'train.warmup_steps': must be >= 0, got -1"),
    ("NSP without an NSP head", P, lambda e: e.pretrain(**{
        "model.name_or_path": _roberta(e), "objective.nsp": "true"}),
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
    # ---- labelled rows: file:line, column and value of the first bad row
    ("jsonl text holds a number", F, lambda e: _bad_train(e, {"text": 42, "label": "a"}),
     "train_bad.jsonl:3: column 'text' holds an int, not a string: 42"),
    ("null training label", F, lambda e: _bad_train(e, {"text": "fine", "label": None}),
     "train_bad.jsonl:3: column 'label' is null: None"),
    ("empty training label", F, lambda e: _bad_train(e, {"text": "fine", "label": ""}),
     "train_bad.jsonl:3: column 'label' is empty: ''"),
    ("null text", F, lambda e: _bad_train(e, {"text": None, "label": "a"}),
     "train_bad.jsonl:3: column 'text' is null: None"),
    ("whitespace-only text", F, lambda e: _bad_train(e, {"text": " \t ", "label": "a"}, **{
        "data.invalid_rows": "error"}), "train_bad.jsonl:3: column 'text' is blank: ' \\t '"),
    ("float label", F, lambda e: _bad_train(e, {"text": "fine", "label": 1.5}),
     "train_bad.jsonl:3: column 'label' holds a float, not a string or an integer: 1.5"),
    ("labels of mixed types", F, lambda e: _bad_train(e, {"text": "fine", "label": 7}),
     "train_bad.jsonl:3: column 'label' holds a number where line 1 holds a str: 7"),
    ("every row invalid under skip", F, lambda e: e.finetune(**{
        "data.train_file": _rows(e, "nulls.jsonl", *[{"text": None, "label": "a"}] * 3),
        "data.invalid_rows": "skip"}), "nulls.jsonl: every row is invalid; first: "),
    ("eval text holds a number", F, lambda e: e.finetune(**{"data.eval_file": _rows(
        e, "dev.jsonl", _ok(0), {"text": 7, "label": "b"})}),
     "dev.jsonl:2: column 'text' holds an int, not a string: 7"),
    ("csv with an empty label cell", F, lambda e: e.finetune(**{"data.train_file": e.file(
        "t.csv", "text,label\nhello there,a\nworld peace,\nagain,b\n")}),
     "t.csv:3: column 'label' is empty: ''"),
    ("tsv without the label column", F, lambda e: e.finetune(**{"data.train_file": e.file(
        "t.tsv", "text\tcategory\nhello\ta\nworld\tb\n")}),
     "no column 'label' (columns: text, category)"),
    ("jsonl label field absent from every line", F, lambda e: e.finetune(**{
        "data.train_file": _rows(e, "t.jsonl", {"text": "a b", "category": "x"},
                                 {"text": "c d", "category": "y"})}),
     "t.jsonl: no column 'label' (columns: text, category)"),
    ("jsonl label field absent from one line", F, lambda e: e.finetune(**{
        "data.train_file": _rows(e, "t.jsonl", _ok(0), {"text": "c d"}, _ok(1))}),
     "t.jsonl:2: column 'label' is missing from the line: None"),
    ("text pair column absent", F, lambda e: e.finetune(**{"data.text_pair_column": "pair"}),
     "column 'pair'"),
    # ---- subsampling
    ("max_train_examples 0", F, lambda e: e.finetune(**{"data.max_train_examples": 0}),
     "'data.max_train_examples': must be a positive integer or null (all), got 0"),
    ("max_train_examples below the classes", F, lambda e: e.finetune(**{
        "data.train_file": e.labelled("abc.jsonl", ["a", "b", "c", "a"]),
        "data.max_train_examples": 2}), "2 is below the 3 classes of"),
    ("max_train_examples above the rows", F, lambda e: e.finetune(**{
        "data.max_train_examples": 10}), "'data.max_train_examples': 10 exceeds the 4 rows of"),
    # ---- task kinds: label shapes and keys (task.kind, task.threshold, eval.metric)
    ("a list label in a single-label task", F, lambda e: _bad_train(
        e, {"text": "fine", "label": ["a", "b"]}),
     "train_bad.jsonl:3: column 'label' holds a list, not a string or an integer: ['a', 'b']; "
     "rows with a list of labels need task.kind=multi_label"),
    ("a float label in a single-label task", F, lambda e: _bad_train(
        e, {"text": "fine", "label": 0.25}), "numeric targets need task.kind=regression"),
    ("a scalar in a multi-label task", F, lambda e: _kind_train(
        e, "multi_label", ["a"], ["b", "a"], "b", []),
     "train_kind.jsonl:3: column 'label' holds a str, not a list of labels: 'b'; "
     "task.kind=multi_label reads a list per row"),
    ("a multi-label csv", F, lambda e: e.finetune(**{"task.kind": "multi_label", (
        "data.train_file"): e.file("t.csv", "text,label\nhello there,a\nworld,b\n")}),
     "t.csv:2: column 'label' holds a str, not a list of labels: 'a'; task.kind=multi_label "
     "reads a list per row (e.g. [\"a\", \"b\"]; [] for none), from .jsonl, .json or .parquet: "
     "a csv cell holds no list"),
    ("an empty label in a list", F, lambda e: _kind_train(
        e, "multi_label", ["a"], ["b"], ["a", ""], []),
     "train_kind.jsonl:3: column 'label' holds a list with an empty label in it: ['a', '']"),
    ("a number in a list of labels", F, lambda e: _kind_train(
        e, "multi_label", ["a"], ["b"], ["a", 0.5], []),
     "train_kind.jsonl:3: column 'label' holds a list with a float in it, not labels"),
    ("a null label set", F, lambda e: _kind_train(e, "multi_label", ["a"], ["b"], None, []),
     "train_kind.jsonl:3: column 'label' is null: None"),
    ("no label in any list", F, lambda e: _kind_train(e, "multi_label", [], [], [], []),
     "train_kind.jsonl: no row has a label (every list is empty)"),
    ("an unknown label in a dev list", F, lambda e: _kind_train(
        e, "multi_label", ["a"], ["b"], ["a", "b"], [], **{"data.eval_file": _rows(
            e, "dev.jsonl", {"text": "x y", "label": ["a"]},
            {"text": "y z", "label": ["b", "c"]})}),
     "dev.jsonl: row 2 has label 'c' in its list, which the training data does not have "
     "(labels: a, b)"),
    ("max_train_examples below the label strata", F, lambda e: _kind_train(
        e, "multi_label", ["a"], ["b"], ["a", "b"], [], **{"data.max_train_examples": 2}),
     "'data.max_train_examples': 2 is below the 3 label strata (rows' rarest labels) of"),
    ("a NaN target", F, lambda e: e.finetune(**{"task.kind": "regression", "data.train_file": (
        e.file("nan.jsonl", '{"text": "a b", "label": 1.5}\n{"text": "c d", "label": 2}\n'
                            '{"text": "e f", "label": NaN}\n'))}),
     "nan.jsonl:3: column 'label' is not a finite number: nan"),
    ("an infinite target", F, lambda e: _kind_train(e, "regression", 1.5, float("inf"), 2.0, 0),
     "train_kind.jsonl:2: column 'label' is not a finite number: inf"),
    ("a text target", F, lambda e: _kind_train(e, "regression", 1.5, 2.5, "high", 0),
     "train_kind.jsonl:3: column 'label' holds a str, not a number: 'high'"),
    ("a csv target that is no number", F, lambda e: e.finetune(**{
        "task.kind": "regression", "data.train_file": e.file(
            "t.csv", "text,label\nhello there,1.5\nworld peace,\nagain,2\n")}),
     "t.csv:3: column 'label' is empty: ''"),
    ("unknown task kind", F, lambda e: e.finetune(**{"task.kind": "multilabel"}),
     "'task.kind': must be one of single_label, multi_label, regression; got 'multilabel'"),
    ("threshold 1.5", F, lambda e: e.finetune(**{"task.kind": "multi_label",
                                                 "task.threshold": 1.5}),
     "'task.threshold': must be a probability in (0, 1), or tune; got 1.5"),
    ("threshold 0", F, lambda e: e.finetune(**{"task.kind": "multi_label",
                                               "task.threshold": 0}),
     "'task.threshold': must be a probability in (0, 1), or tune; got 0"),
    ("threshold tuned without a dev set", F, lambda e: e.finetune(**{
        "task.kind": "multi_label", "task.threshold": "tune"}),
     "'task.threshold': tune picks the threshold on the dev set: set data.eval_file"),
    ("threshold tuned for a single-label task", F, lambda e: e.finetune(**{
        "task.threshold": "tune"}),
     "'task.threshold': tune picks a multi_label threshold; task.kind is single_label"),
    ("a metric of another task kind", F, lambda e: e.finetune(**{
        "task.kind": "regression", "eval.metric": "accuracy"}),
     "'eval.metric': must be auto or, for task.kind=regression, one of pearson, spearman, mse; "
     "got 'accuracy'"),
    # ---- model-dependent keys, checked against the model's config before any work
    ("head layer below the model", F, lambda e: e.finetune(**{"head.layers": "[-40]"}),
     "'head.layers': -40 addresses no hidden state of the 2-layer model (valid: -3..2;"),
    ("head layer above the model", F, lambda e: e.finetune(**{"head.layers": "[0,3]",
                                                              "head.pooling": "mean"}),
     "'head.layers': 3 addresses no hidden state of the 2-layer model (valid: -3..2;"),
    ("pooler on a model without one", F, lambda e: e.finetune(**{
        "model.name_or_path": _roberta(e), "head.pooling": "pooler"}),
     "'head.pooling': pooler, but 'roberta' models (RobertaForSequenceClassification) have no "
     "pooler"),
    ("tokenizer without a cls token", F, lambda e: e.finetune(**{
        "model.tokenizer": _wordlevel(e, pad_token="[PAD]")}), "has no cls token"),
    ("whole-word masking without word boundaries", P, lambda e: e.pretrain(**{
        "model.tokenizer": _wordlevel(e, pad_token="[PAD]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]"),
        "objective.masking": "whole_word"}), "marks no word boundaries"),
    # ---- values of the newer keys
    ("unknown masking", P, lambda e: e.pretrain(**{"objective.masking": "spans"}),
     "'objective.masking': must be one of token, whole_word, span; got 'spans'"),
    ("span p 0", P, lambda e: e.pretrain(**{"objective.span_geometric_p": 0}),
     "'objective.span_geometric_p': must be in (0, 1], got 0"),
    ("span max words 0", P, lambda e: e.pretrain(**{"objective.span_max_words": 0}),
     "'objective.span_max_words': must be >= 1, got 0"),
    ("head warm-up steps -1", P, lambda e: e.pretrain(**{"objective.head_warmup.steps": -1}),
     "'objective.head_warmup.steps': must be auto or an integer >= 0, got -1"),
    ("head warm-up steps soon", P, lambda e: e.pretrain(**{
        "objective.head_warmup.steps": "soon"}),
     "'objective.head_warmup.steps': must be auto or an integer >= 0, got 'soon'"),
    ("head warm-up lr 0", P, lambda e: e.pretrain(**{"objective.head_warmup.lr": 0}),
     "'objective.head_warmup.lr': must be > 0, got 0"),
    ("extend_vocab with from_scratch", P, lambda e: [
        "recipe=demo", f"output_dir={e.out}", f"model.extend_vocab={EXTEND}"],
     "'model.extend_vocab': extends a pretrained tokenizer"),
    ("extend_vocab max_new_tokens 0", P, lambda e: e.pretrain(**{
        "model.extend_vocab": "{max_new_tokens:0,min_frequency:2}"}),
     "'model.extend_vocab.max_new_tokens': must be >= 1, got 0"),
    ("extend_vocab to fine-tune", F, lambda e: e.finetune(**{"model.extend_vocab": EXTEND}),
     "'model.extend_vocab': is for pretraining"),
    ("mixed precision fp8", P, lambda e: e.pretrain(**{"train.mixed_precision": "fp8"}),
     "'train.mixed_precision': must be auto, no, fp16, bf16 or null"),
    ("invalid_rows maybe", F, lambda e: e.finetune(**{"data.invalid_rows": "maybe"}),
     "'data.invalid_rows': must be one of error, skip; got 'maybe'"),
    ("head_tokens abc", F, lambda e: e.finetune(**{"data.head_tokens": "abc"}),
     "'data.head_tokens': must be auto or an integer, got 'abc'"),
    ("fine-tuning adam epsilon 0", F, lambda e: e.finetune(**{"train.adam_epsilon": 0}),
     "'train.adam_epsilon': must be > 0, got 0"),
    ("checkpoint every 0 steps", F, lambda e: e.finetune(**{"checkpoint.every_steps": 0}),
     "'checkpoint.every_steps': must be > 0 or null (every epoch), got 0"),
    ("fine-tuning evaluation every 0 steps", F, lambda e: e.finetune(**{"eval.every_steps": 0}),
     "'eval.every_steps': must be a positive number of optimizer steps or null (every epoch), "
     "got 0"),
    ("early stopping patience 0", F, lambda e: e.finetune(**{
        "data.eval_file": e.labelled("dev.jsonl", ["a", "b"]),
        "train.early_stopping_patience": 0}),
     "'train.early_stopping_patience': must be a positive number of evaluations or null (off), "
     "got 0"),
    ("early stopping without a dev set", F, lambda e: e.finetune(**{
        "train.early_stopping_patience": 2}),
     "'train.early_stopping_patience': needs a dev set to evaluate: set data.eval_file"),
    # ---- other values
    ("head dropout 1", F, lambda e: e.finetune(**{"head.dropout": 1}),
     "'head.dropout': must be in [0, 1), got 1.0"),
    ("layer decay 0", F, lambda e: e.finetune(**{"train.layer_decay": 0}),
     "'train.layer_decay': must be in (0, 1], got 0"),
    ("unfreeze by steps without a period", F, lambda e: e.finetune(**{"train.unfreeze": "steps"}),
     "'train.unfreeze_every_steps': must be > 0 when train.unfreeze=steps"),
    ("segments with text pairs", F, lambda e: e.finetune(**{
        "data.truncation": "segments", "data.text_pair_column": "pair"}),
     "segments (hierarchical) does not take text pairs"),
    ("repeated task names", F, lambda e: _tasks(e, "topic", "topic"),
     "'tasks': task names repeat: ['topic', 'topic']"),
    ("scratch positions below the sequence", P, lambda e: [
        "recipe=demo", f"output_dir={e.out}", "model.from_scratch.max_position_embeddings=64"],
     "'model.from_scratch.max_position_embeddings': 64 is below data.max_seq_length=128"),
    ("adam beta2 1", F, lambda e: e.finetune(**{"train.adam_beta2": 1}),
     "'train.adam_beta2': must be in [0, 1), got 1.0"),
    # ---- damaged model folders: an interrupted copy, named before any work
    ("weights cut short to pretrain", P, lambda e: e.pretrain(**{
        "model.name_or_path": _damaged(e, e.model_dir, "model.safetensors")}),
     f"further_pt: error: model.name_or_path: {{tmp}}/damaged/{CUT}"),
    ("weights cut short to fine-tune", F, lambda e: e.finetune(**{
        "model.name_or_path": _damaged(e, e.model_dir, "model.safetensors")}),
     f"further_pt: error: model.name_or_path: {{tmp}}/damaged/{CUT}"),
    ("weights with a garbled header", P, lambda e: e.pretrain(**{
        "model.name_or_path": _damaged(e, e.model_dir, "model.safetensors",
                                       (12).to_bytes(8, "little") + b"not a header")}),
     "damaged/model.safetensors has a damaged header (not a safetensors file?)"),
    ("tokenizer.json cut short to pretrain", P, lambda e: e.pretrain(**{
        "model.name_or_path": _damaged(e, e.model_dir, "tokenizer.json")}),
     f"further_pt: error: model.tokenizer: {{tmp}}/damaged/{NOT_JSON}"),
    ("tokenizer.json cut short to fine-tune", F, lambda e: e.finetune(**{
        "model.name_or_path": _damaged(e, e.model_dir, "tokenizer.json")}),
     f"further_pt: error: model.tokenizer: {{tmp}}/damaged/{NOT_JSON}"),
    ("tokenizer.json not a tokenizer", P, lambda e: e.pretrain(**{
        "model.name_or_path": _damaged(e, e.model_dir, "tokenizer.json", b'{"a": 1}')}),
     "damaged/tokenizer.json is JSON but not a tokenizer the tokenizers library reads"),
    # ---- further-pt predict: its model folder and input, checked before the model loads
    ("predict: weights cut short", PREDICT, lambda e: e.predict(
        e.labelled("test.jsonl", ["a"]), _damaged(e, e.finetuned, "model.safetensors")),
     f"further_pt: error: model: {{tmp}}/damaged/{CUT}"),
    ("predict: tokenizer.json cut short", PREDICT, lambda e: e.predict(
        e.labelled("test.jsonl", ["a"]), _damaged(e, e.finetuned, "tokenizer.json")),
     f"further_pt: error: model.tokenizer: {{tmp}}/damaged/{NOT_JSON}"),
    ("predict: null text", PREDICT, lambda e: e.predict(_rows(
        e, "test.jsonl", {"text": "fine"}, {"text": None})),
     "further_pt: error: {tmp}/test.jsonl:2: column 'text' is null: None"),
    ("predict: text holds a number", PREDICT, lambda e: e.predict(_rows(
        e, "test.jsonl", {"text": "fine"}, {"text": "also fine"}, {"text": 42})),
     "further_pt: error: {tmp}/test.jsonl:3: column 'text' holds an int, not a string: 42"),
    ("predict: blank text in a csv", PREDICT, lambda e: e.predict(e.file(
        "test.csv", "id,text\n1,hello there\n2,   \n")),
     "further_pt: error: {tmp}/test.csv:3: column 'text' is blank: '   '"),
    ("unknown tracker did-you-mean", P, lambda e: e.pretrain(**{"train.trackers": "[tensorbord]"}),
     "config key 'train.trackers[0]': unknown tracker 'tensorbord' (did you mean "
     "'tensorboard'?)"),
    ("tracker listed twice", F, lambda e: e.finetune(**{
        "train.trackers": "[tensorboard,tensorboard]"}), "'train.trackers': lists a tracker twice"),
    ("trackers not a list", F, lambda e: e.finetune(**{"train.trackers": 5}),
     "config key 'train.trackers': a list of tracker names, [] or none"),
    ("predict: empty input", PREDICT, lambda e: e.predict(e.file("test.jsonl", "")),
     "further_pt: error: predict input: file {tmp}/test.jsonl is empty"),
    ("predict: input without rows", PREDICT, lambda e: e.predict(e.file("test.jsonl", "\n\n")),
     "further_pt: error: {tmp}/test.jsonl: holds no rows"),
    ("predict: input without the text column", PREDICT, lambda e: e.predict(_rows(
        e, "test.jsonl", {"body": "fine"})),
     "further_pt: error: {tmp}/test.jsonl: no column 'text' (columns: body)"),
    ("predict: an output suffix without a format", PREDICT, lambda e: [
        *e.predict(e.labelled("test.jsonl", ["a"]))[:2], f"output={e.out / 'p.txt'}"],
     "further_pt: error: predict: output={tmp}/out/p.txt: the format is read from the suffix: "
     ".jsonl, .parquet, .csv"),
    ("predict: top_k not a positive integer", PREDICT, lambda e: [
        *e.predict(e.labelled("test.jsonl", ["a"])), "top_k=0"],
     "further_pt: error: predict: top_k=0 must be a positive integer"),
    ("predict: max_length beyond the positions", PREDICT, lambda e: [
        *e.predict(e.labelled("test.jsonl", ["a"])), "max_length=100"],
     "further_pt: error: predict: max_length=100 exceeds the model's 64 positions"),
    # ---- class weights and hub specs (issue 28)
    ("class weight for an unknown label", F, lambda e: e.finetune(**{
        "train.class_weights": "{a:1,zz:2}"}),
     "config key 'train.class_weights.zz': {tmp}/train.jsonl has no class 'zz' (classes: a, b)"),
    ("class weight not positive", F, lambda e: e.finetune(**{"train.class_weights": "{a:0}"}),
     "config key 'train.class_weights.a': a class weight must be a positive number, got 0"),
    ("class weights an unknown word", F, lambda e: e.finetune(**{
        "train.class_weights": "balance"}),
     "config key 'train.class_weights': 'balance' is not a setting: give null, balanced or a "
     "mapping {label: weight}"),
    ("class weights in a regression task", F, lambda e: e.finetune(**{
        "train.class_weights": "balanced", "task.kind": "regression"}),
     "config key 'train.class_weights': weights the classes of a single_label task; task.kind "
     "is regression"),
    ("hub dataset with too many parts", F, lambda e: e.finetune(**{
        "data.train_file": "hf:glue:mrpc:train:x"}),
     "further_pt: error: hf:glue:mrpc:train:x: a hub dataset is hf:NAME, hf:NAME:SPLIT or "
     "hf:NAME:CONFIG:SPLIT (e.g. hf:glue:mrpc:train)"),
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
                   request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    env = Env(tmp_path, corpus_file, tiny_model_dir, tokenizer,
              lambda: request.getfixturevalue("finetuned_dir"))
    argv = [str(a) for a in make(env)]
    before = _snapshot(env.out)
    capsys.readouterr()
    code = ENTRY[entry](argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    errors = [line for line in err if line.startswith("further_pt:")]
    assert len(errors) == 1 and errors[-1] == err[-1], err
    assert errors[0].startswith("further_pt: error: ")
    assert expected.replace("{tmp}", str(tmp_path)) in errors[0]
    assert _snapshot(env.out) == before, "the output dir must not be touched"


@pytest.fixture(scope="session")
def finetuned_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny BERT fine-tuned for one epoch on four rows: a folder ``predict`` takes."""
    tmp = tmp_path_factory.mktemp("finetuned")
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"text number {i}", "label": "ab"[i % 2]})
                             + "\n" for i in range(4)))
    assert finetune_main(["recipe=fit", f"output_dir={tmp / 'run'}",
                          f"model.name_or_path={tiny_model_dir}", f"data.train_file={train}",
                          "data.max_seq_length=32", "data.head_tokens=8", "train.epochs=1",
                          "train.batch_size=2"]) == 0
    return tmp / "run" / "final"


def test_the_catalogue_is_long_enough() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize(("layers", "bad"), [([-3, 2], None), ([0, -1], None), ([-4], -4),
                                             ([1, 3], 3)])
def test_head_layers_bounds(layers: list[int], bad: int | None) -> None:
    """A 2-layer encoder has 3 hidden states (embeddings + 2): indices -3..2, no more."""
    from omegaconf import OmegaConf
    from transformers import BertConfig

    from further_pt.errors import ConfigError
    from further_pt.objectives.classification import check_head

    head = OmegaConf.create({"pooling": "mean", "layers": layers})
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    if bad is None:
        check_head(config, head)
        return
    with pytest.raises(ConfigError, match=f"'head.layers': {bad} addresses no hidden state of "
                                          r"the 2-layer model \(valid: -3\.\.2;"):
        check_head(config, head)


def test_max_seq_length_alone_is_valid(tmp_path: Path) -> None:
    """recipe=fit with only data.max_seq_length=128: head_tokens auto follows (32 of 126)."""
    from further_pt.finetune import load
    from further_pt.objectives.classification import head_tokens

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "x", "label": "a"}\n')
    cfg = load(["recipe=fit", f"output_dir={tmp_path / 'out'}", "model.name_or_path=m",
                f"data.train_file={train}", "data.max_seq_length=128"])
    assert cfg.data.head_tokens == "auto"
    assert head_tokens(cfg.data) == 32
