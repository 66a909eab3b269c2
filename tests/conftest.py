"""Shared fixtures: real text, a WordPiece tokenizer trained on it, a tiny BERT. All offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """Real multi-sentence English: docstrings of a few standard-library modules."""
    import sysconfig

    from further_pt.data.builtin import _docstrings

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for name in ("argparse.py", "subprocess.py", "tarfile.py", "logging/__init__.py",
                 "pathlib.py", "typing.py", "inspect.py", "zipfile/__init__.py", "shutil.py"):
        path = stdlib / name
        if path.exists():
            found.extend(_docstrings(path))
    assert len(found) > 200
    return found


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(docs: list[str]):
    from further_pt.data.tokenizer import train_wordpiece

    return train_wordpiece(docs, vocab_size=800, lowercase=True, max_seq_length=64)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A BertForPreTraining (MLM + NSP heads), 2 x 32, saved as a HF folder."""
    import torch
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id)
    BertForPreTraining(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Every test starts from accelerate's state as a new process would: a test whose
    Accelerator took bf16 (``auto`` on a CPU with avx512_bf16) must not leave that precision
    to the next, which accelerate would refuse or silently reuse."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
