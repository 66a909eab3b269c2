"""Tokenizer: load a model's tokenizer (hub id or folder) with one-line errors for a damaged
one, or train a WordPiece vocabulary on a corpus for a model built from scratch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
)

from further_pt.errors import ConfigError, one_line

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, lowercase: bool,
                    max_seq_length: int) -> Any:
    """Train a BERT-style WordPiece tokenizer on ``texts``; returns a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                               show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase,
                             model_max_length=max_seq_length)  # the model's position limit


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a hub id or folder; a ConfigError naming the file when it cannot load.

    The ``tokenizers`` library reports a damaged ``tokenizer.json`` (an interrupted copy, a
    hand edit) as a bare ``Exception`` or a JSON error without the file's name, so a folder
    whose tokenizer does not load is searched for the file that is not valid JSON.
    """
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        damaged = _damaged_tokenizer(Path(name_or_path).expanduser())
        if damaged is None and not isinstance(exc, OSError | ValueError):
            raise
        detail = damaged or f"cannot load a tokenizer from {name_or_path!r}"
        raise ConfigError(f"model.tokenizer: {detail} ({one_line(exc, 200)})") from None


def _damaged_tokenizer(folder: Path) -> str | None:
    """What is wrong with the first damaged tokenizer file of a folder, naming it; else None."""
    for name in TOKENIZER_JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return (f"{path} is not valid JSON ({path.stat().st_size:,} bytes; cut short by "
                    "an interrupted copy? copy the folder again)")
        if name == "tokenizer.json":
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(path))
            except Exception:
                return f"{path} is JSON but not a tokenizer the tokenizers library reads"
    return None
