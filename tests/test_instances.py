"""NSP instances follow Google's algorithm; packed blocks keep every token."""

from __future__ import annotations

import random

import datasets
import pytest

from further_pt.data.instances import (
    build_instances,
    collate,
    create_nsp_instances,
    pack_documents,
    split_sentences,
)

CLS, SEP = 1, 2


def _synthetic_docs(n_docs: int = 40) -> list[list[list[int]]]:
    """Token t = 1000 * (doc + 1) + 10 * sentence + k: every token says where it came from."""
    rng = random.Random(0)
    docs = []
    for d in range(n_docs):
        sentences = []
        for s in range(rng.randint(1, 12)):
            sentences.append([1000 * (d + 1) + 10 * s + k for k in range(rng.randint(3, 9))])
        docs.append(sentences)
    return docs


def _origin(token: int) -> tuple[int, int]:
    return token // 1000 - 1, (token % 1000) // 10


def test_nsp_instances_labels_lengths_and_provenance() -> None:
    docs = _synthetic_docs()
    made = create_nsp_instances(docs, max_seq_length=32, short_seq_prob=0.1, cls_id=CLS,
                                sep_id=SEP, rng=random.Random(1))
    assert len(made) > 100
    random_next = 0
    for ids, types, label in made:
        assert len(ids) <= 32 and len(ids) == len(types)
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
        cut = ids.index(SEP)
        a, b = ids[1:cut], ids[cut + 1:-1]
        assert a and b
        assert types == [0] * (cut + 1) + [1] * (len(b) + 1)
        doc_a = {_origin(t)[0] for t in a}
        doc_b = {_origin(t)[0] for t in b}
        assert len(doc_a) == 1 and len(doc_b) == 1  # A and B each from one document
        if label == 0:  # IsNext: same document, B starts right after A's last sentence
            assert doc_a == doc_b
            assert _origin(b[0])[1] >= _origin(a[-1])[1]
        else:
            random_next += 1
            assert doc_a != doc_b
    share = random_next / len(made)
    assert 0.35 < share < 0.75, share  # one-sentence chunks are always random: above 0.5


def test_truncation_respects_max_length_even_for_long_sentences() -> None:
    docs = [[list(range(1000 * (d + 1), 1000 * (d + 1) + 200))] for d in range(5)]
    made = create_nsp_instances(docs, max_seq_length=16, short_seq_prob=0.0, cls_id=CLS,
                                sep_id=SEP, rng=random.Random(0))
    assert made and all(len(ids) <= 16 for ids, _, _ in made)


def test_short_documents_skew_towards_random_next_and_are_reported(tokenizer, caplog) -> None:
    from further_pt.data.instances import random_next_share

    short = [f"Package number {i} does one thing. It is small." for i in range(300)]
    ds = datasets.Dataset.from_dict({"text": short})
    with caplog.at_level("WARNING"):
        built = build_instances(ds, tokenizer, nsp=True, max_seq_length=64, short_seq_prob=0.0,
                                txt_documents="line", seed=0)
    assert random_next_share(built) > 0.7
    assert "random-next: the documents are short" in caplog.text


def test_single_document_gives_no_mislabelled_random_pairs() -> None:
    made = create_nsp_instances([[[10, 11], [12, 13], [14, 15]]], max_seq_length=64,
                                short_seq_prob=0.0, cls_id=CLS, sep_id=SEP,
                                rng=random.Random(0))
    assert made and all(label == 0 for _, _, label in made)


def test_pack_documents_keeps_every_token_in_order() -> None:
    docs = [[5] * 7, [6] * 20, [7] * 3]
    blocks = pack_documents(docs, max_seq_length=10, cls_id=CLS, sep_id=SEP)
    assert all(b[0] == CLS and b[-1] == SEP for b in blocks)
    assert all(len(b) == 10 for b in blocks[:-1]) and len(blocks[-1]) <= 10
    inner = [t for b in blocks for t in b[1:-1]]
    assert inner == [5] * 7 + [SEP] + [6] * 20 + [SEP] + [7] * 3


def test_split_sentences() -> None:
    text = "It runs. Then it stops! Does it? Yes (mostly). e.g. this stays joined."
    assert split_sentences(text) == ["It runs.", "Then it stops!", "Does it?",
                                     "Yes (mostly). e.g. this stays joined."]
    assert split_sentences("one\ntwo\n\n", "blank_line") == ["one", "two"]


@pytest.mark.parametrize("nsp", [True, False])
def test_build_instances_is_cached_and_deterministic(tmp_path, tokenizer, docs, nsp) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs[:200]) + "\n")
    ds = datasets.load_dataset("text", data_files=[str(path)], split="train",
                               cache_dir=str(tmp_path / "cache"))
    kwargs = dict(nsp=nsp, max_seq_length=64, short_seq_prob=0.1, txt_documents="line", seed=3)
    first = build_instances(ds, tokenizer, **kwargs)
    second = build_instances(ds, tokenizer, **kwargs)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first["input_ids"] == second["input_ids"]
    assert max(len(x) for x in first["input_ids"]) <= 64
    if nsp:
        assert set(first["next_sentence_label"]) == {0, 1}
    else:
        assert all(len(x) == 64 for x in first["input_ids"][:-1])
    other_seed = build_instances(ds, tokenizer, **{**kwargs, "seed": 4})
    assert other_seed.cache_files != first.cache_files


def test_collate_pads_dynamically() -> None:
    rows = [{"input_ids": [1, 5, 2], "token_type_ids": [0, 0, 0], "next_sentence_label": 1},
            {"input_ids": [1, 5, 6, 7, 2], "token_type_ids": [0, 0, 0, 1, 1],
             "next_sentence_label": 0}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 2, 0, 0], [1, 5, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["next_sentence_label"].tolist() == [1, 0]
    assert collate(rows, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_vectorised_packing_equals_the_reference_packing() -> None:
    from further_pt.data.instances import pack_arrow

    rng = random.Random(0)
    for _ in range(20):
        docs = [[rng.randint(5, 99) for _ in range(rng.randint(0, 300))]
                for _ in range(rng.randint(1, 30))]
        want = pack_documents([d for d in docs if d], max_seq_length=32, cls_id=CLS, sep_id=SEP)
        got = pack_arrow(docs, max_seq_length=32, cls_id=CLS, sep_id=SEP)
        assert got.column("input_ids").to_pylist() == want
