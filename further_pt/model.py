"""Model: load an encoder and its tokenizer (any hub id or folder), or build a new BERT.

Everything goes through the Auto* classes. With ``objective.nsp: true`` the
model is loaded as ``AutoModelForPreTraining`` (``BertForPreTraining``: MLM and
NSP heads); otherwise as ``AutoModelForMaskedLM``. The checks that need only the
model's config (NSP head present, sequence length within the position
embeddings, tokenizer and embedding sizes agree) run before any weight loads.

``model.from_scratch`` builds a ``BertConfig`` and trains a WordPiece tokenizer
with the ``tokenizers`` library on the training corpus: offline runs, tests and
general pretraining need no download. WordPiece training is not bit-reproducible
from one process to the next (hash-map order breaks ties: tokenizers issue
#1794), so the trained tokenizer is saved in the run and reused on resume.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    PretrainedConfig,
)

from further_pt.config import ConfigError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


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


def scratch_config(cfg: DictConfig, tokenizer: Any) -> BertConfig:
    fs = cfg.model.from_scratch
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=fs.hidden_size,
        num_hidden_layers=fs.num_hidden_layers,
        num_attention_heads=fs.num_attention_heads,
        intermediate_size=fs.intermediate_size,
        max_position_embeddings=fs.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.tokenizer: cannot load a tokenizer from {name_or_path!r} "
            f"({' '.join(str(exc).split())[:200]})"
        ) from None


def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} is not a model folder or hub id "
            f"({' '.join(str(exc).split())[:200]})"
        ) from None


def pretraining_class(config: PretrainedConfig, nsp: bool) -> type:
    """The Auto* class for the objective; ConfigError if NSP is asked of a model without it."""
    if not nsp:
        return AutoModelForMaskedLM
    model_cls = AutoModelForPreTraining._model_mapping.get(type(config), None)
    if model_cls is None or "next_sentence_label" not in inspect.signature(
            model_cls.forward).parameters:
        raise ConfigError(
            f"objective.nsp=true but {config.model_type!r} models have no NSP head "
            f"({getattr(model_cls, '__name__', 'no pretraining class')}); set objective.nsp=false"
        )
    return AutoModelForPreTraining


def check_compatible(config: PretrainedConfig, tokenizer: Any, max_seq_length: int, *,
                     needs_mask: bool = True) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None:
        limit -= _POSITION_OFFSET.get(config.model_type, 0)
        if max_seq_length > limit:
            raise ConfigError(
                f"data.max_seq_length={max_seq_length} exceeds the model's {limit} position "
                "embeddings"
            )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's embeddings hold "
            f"{vocab}: tokenizer and model do not match"
        )
    if needs_mask and tokenizer.mask_token_id is None:
        raise ConfigError("model.tokenizer has no mask token: it cannot be used for MLM")


def load_pretraining_model(name_or_path: str | Path, config: PretrainedConfig, *, nsp: bool,
                           attn_implementation: str | None, trust_remote_code: bool) -> Any:
    model_cls = pretraining_class(config, nsp)
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return model_cls.from_pretrained(str(name_or_path), **kwargs)


def new_pretraining_model(config: PretrainedConfig, *, nsp: bool,
                          attn_implementation: str | None) -> Any:
    model_cls = pretraining_class(config, nsp)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return model_cls.from_config(config)


def save_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """A standard HF folder: safetensors weights + config + tokenizer."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
