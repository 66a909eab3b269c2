"""further-pt select: the corpus documents nearest to a task's texts (kNN-TAPT)."""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from further_pt.cli.main import main
from further_pt.data import selection
from further_pt.data.corpus import Source, load_documents

FILLER = [f"{a}{b}" for a in ("data", "file", "user", "list", "time", "code", "test", "note")
          for b in ("set", "map", "row", "key", "log", "run", "tag", "box", "bit", "way")]
PLANTED = ["The volcano erupted and lava flowed down its slopes.",
           "Magma rises beneath the volcano before an eruption.",
           "Basalt forms when lava from an eruption cools quickly."]
TOPIC = "lava and magma from a volcano eruption"


def filler(n: int, seed: int = 0, words: int = 14) -> list[str]:
    """n distinct documents of common words, none of the planted topic's."""
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(FILLER) for _ in range(words)) for i in range(n)]


def plant(docs: list[str], planted: list[str], seed: int = 1) -> list[str]:
    docs = list(docs)
    rng = random.Random(seed)
    for text in planted:
        docs.insert(rng.randrange(len(docs) + 1), text)
    return docs


def inputs(folder: Path, corpus: list[str], task: list[str]) -> list[str]:
    """A .txt corpus and a .jsonl task written to folder; select's arguments for them."""
    corpus_file, task_file = folder / "corpus.txt", folder / "task.jsonl"
    corpus_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    task_file.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in task))
    return [f"corpus=[{corpus_file}]", f"task={task_file}", f"output={folder / 'knn.txt.gz'}"]


def run(folder: Path, corpus: list[str], task: list[str], *keys: str) -> tuple[dict, list[str]]:
    """select -> (report, the output's lines)."""
    report = selection.select(selection.parse([*inputs(folder, corpus, task), *keys]))
    with gzip.open(folder / "knn.txt.gz", "rt", encoding="utf-8") as fh:
        return report, fh.read().splitlines()


def test_the_planted_documents_are_the_nearest(tmp_path: Path) -> None:
    # distractors share one topic word each, inside many common words
    distractors = [f"{w} " + " ".join(FILLER[i:i + 20]) for i, w in enumerate(["lava", "magma"])]
    corpus = plant(filler(2000) + distractors, PLANTED)
    for chunk_size in (20000, 300):  # one chunk, or seven merged top-k's: the same answer
        report, lines = run(tmp_path, corpus, [TOPIC], "k=3", f"chunk_size={chunk_size}")
        assert sorted(lines) == sorted(PLANTED)
        assert (report["corpus_documents"], report["task_texts"], report["selected"]) == (
            2005, 1, 3)
        assert report["similarity"]["min"] > 0
        assert {ex["document"] for ex in report["examples"]} <= set(PLANTED)
        assert all(ex["nearest_task_text"] == TOPIC for ex in report["examples"])
    report, lines = run(tmp_path, corpus, [TOPIC], "k=5")  # 2 more: the distractors
    assert sorted(lines) == sorted(PLANTED + distractors)


def test_a_document_is_written_once(tmp_path: Path) -> None:
    """Two task texts with the same neighbours; copies of a document in other chunks."""
    copies = [PLANTED[0], "  The volcano erupted and lava\tflowed down its slopes. ", PLANTED[0]]
    corpus = plant(filler(1500), PLANTED + copies)
    task = [TOPIC, "volcano eruption: lava, magma"]
    report, lines = run(tmp_path, corpus, task, "k=3", "chunk_size=200")
    assert sorted(lines) == sorted(PLANTED)  # not the first one thrice
    assert report["selected"] == 3 and report["selected_by_several_task_texts"] == 3
    assert report["task_texts_with_fewer_than_k"] == 0


def test_blocks_of_task_texts_give_the_same_answer(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = plant(filler(1000), PLANTED)
    task = [TOPIC, *(" ".join(FILLER[i::9]) for i in range(9))]
    whole, lines = run(tmp_path, corpus, task, "k=4", "chunk_size=300")
    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 900)  # 3 task texts a block, cached
    blocks, lines_in_blocks = run(tmp_path, corpus, task, "k=4", "chunk_size=300")
    assert lines == lines_in_blocks and whole.pop("seconds") >= 0 and blocks.pop("seconds") >= 0
    assert whole == blocks and whole["selected"] > 4


def test_task_texts_are_excluded_unless_included(tmp_path: Path) -> None:
    corpus = plant(filler(1000), [*PLANTED, TOPIC])  # the task text itself is in the corpus
    report, lines = run(tmp_path, corpus, [TOPIC], "k=3")
    assert sorted(lines) == sorted(PLANTED)
    assert report["task_texts_in_corpus_excluded"] == 1
    report, lines = run(tmp_path, corpus, [TOPIC], "k=3", "include_task=true")
    assert lines[0] == TOPIC and sorted(lines[1:]) == sorted(PLANTED)
    assert report["documents_written"] == 4


def test_the_output_is_a_pretraining_corpus(tmp_path: Path) -> None:
    """A .jsonl corpus with multi-line documents in; one flat document a line out."""
    rows = [{"body": t} for t in filler(300)] + [
        {"body": "The volcano erupted.\nLava flowed\n\ndown its slopes."}, {"body": None},
        {"body": "Magma rises beneath the volcano\r\nbefore an eruption."}]
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    task = tmp_path / "task.txt"
    task.write_text(TOPIC + "\n")
    out = tmp_path / "picked" / "knn.txt"
    report = selection.select(selection.parse([f"corpus={corpus}", f"task={task}",
                                               f"output={out}", "k=2", "text_column=body"]))
    docs = load_documents(Source(str(out), (str(out),)), txt_documents="line",
                          text_column="text", cache_dir=tmp_path / "cache")
    assert sorted(docs["text"]) == ["Magma rises beneath the volcano before an eruption.",
                                    "The volcano erupted. Lava flowed down its slopes."]
    assert report["corpus_documents"] == 302
    assert json.loads((tmp_path / "picked" / "knn.select.json").read_text()) == report


@pytest.mark.slow
def test_memory_stays_flat_as_the_corpus_grows(tmp_path: Path) -> None:
    task = [TOPIC, *(" ".join(FILLER[i::7]) for i in range(7))]

    def peak(n: int) -> int:
        folder = tmp_path / str(n)
        folder.mkdir()
        opts = selection.parse([*inputs(folder, plant(filler(n, words=60), PLANTED), task),
                                "k=3", "chunk_size=500"])
        tracemalloc.start()
        try:
            assert selection.select(opts)["selected"] >= 3
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (tmp_path / "warm").mkdir()
    run(tmp_path / "warm", plant(filler(50), PLANTED), task, "k=3")  # imports are not the corpus
    small, large = peak(1_000), peak(10_000)  # the large corpus's text: ~5 MB
    assert large / small < 2 and large - small < 3_000_000, (small, large)


def test_embedding_method(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A random tiny BERT: it runs, picks k per task text, deterministically. It does tell the
    planted sentences from the word lists (by form, not meaning): scores reach the right rows."""
    corpus = plant(filler(200), PLANTED)
    task = [TOPIC, "datamap filerow userkey"]
    keys = ("method=embedding", f"encoder={tiny_model_dir}", "k=4", "batch_size=16",
            "chunk_size=64")
    first, lines = run(tmp_path, corpus, task, *keys)
    again, lines_again = run(tmp_path, corpus, task, *keys)
    assert lines == lines_again and first["examples"] == again["examples"]
    assert first["task_texts_with_fewer_than_k"] == 0 and 4 <= first["selected"] <= 8
    assert len(lines) == first["selected"] and set(lines) <= set(corpus)
    assert set(PLANTED) <= set(lines)


def test_help_lists_every_key_with_its_default(capsys: pytest.CaptureFixture) -> None:
    assert main(["select", "--help"]) == 0
    out = capsys.readouterr().out
    for key, (default, _) in selection.KEYS.items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [key])
        assert line.split()[1] == str(default).lower()
    assert out.count("(required)") == 3


@pytest.mark.parametrize(("case", "expected"), [
    ("empty_corpus", "holds no document"),
    ("empty_file", "is empty"),
    ("k=0", "k must be a whole number > 0, got '0'"),
    ("k=-2", "k must be a whole number > 0, got '-2'"),
    ("missing_task", "task: file"),
    ("missing_corpus", "no local file matches"),
    ("kk=3", "'kk' is an unknown key (did you mean 'k'?)"),
    ("output=out.jsonl", "must end .txt or .txt.gz"),
    ("task_column", "no column 'text'"),
    ("method=embedding", "method=embedding and encoder=MODEL_DIR go together"),
])
def test_bad_input_is_one_line(case: str, expected: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    corpus, task = tmp_path / "corpus.txt", tmp_path / "task.jsonl"
    corpus.write_text("\n \n\n" if case == "empty_corpus" else "" if case == "empty_file"
                      else "\n".join(PLANTED) + "\n")
    task.write_text(json.dumps({"sentence" if case == "task_column" else "text": TOPIC}) + "\n")
    args = {"corpus": f"[{corpus}]", "task": str(task), "output": str(tmp_path / "out.txt")}
    if case == "missing_task":
        args["task"] = str(tmp_path / "nope.jsonl")
    if case == "missing_corpus":
        args["corpus"] = f"[{corpus},{tmp_path / 'nope.txt'}]"
    if "=" in case:
        args[case.split("=")[0]] = case.split("=")[1]
    assert main(["select", *(f"{k}={v}" for k, v in args.items())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out.txt").exists()
