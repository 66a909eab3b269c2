"""Model: load an encoder and its tokenizer (any hub id or folder), or build a new BERT.

Everything goes through the Auto* classes. With ``objective.nsp: true`` the
model is loaded as ``AutoModelForPreTraining`` (``BertForPreTraining``: MLM and
NSP heads); otherwise as ``AutoModelForMaskedLM`` - BERT, RoBERTa, DistilBERT,
ELECTRA (the generator), DeBERTa-v2/v3 and ModernBERT are tested. The checks that
need only the model's config (an MLM/NSP head exists, sequence length within the
position embeddings, tokenizer and embedding sizes agree) run before any weight loads.

``attn_implementation="sdpa"`` is taken as a preference: DeBERTa-v2 has only the
eager kernel, so there it falls back to eager with a warning rather than making
every DeBERTa run override the recipe. Any other unsupported choice is a ConfigError.

``model.from_scratch`` builds a ``BertConfig`` and trains a WordPiece tokenizer
with the ``tokenizers`` library on the training corpus: offline runs, tests and
general pretraining need no download. WordPiece training is not bit-reproducible
from one process to the next (hash-map order breaks ties: tokenizers issue
#1794), so the trained tokenizer is saved in the run and reused on resume.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    BertConfig,
    PretrainedConfig,
)

from further_pt.errors import ConfigError, SetupError, one_line

logger = logging.getLogger(__name__)

_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


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



def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, once a local folder's weights files are known whole.

    Every run reads the config before any work, so a weights file cut short (an interrupted
    copy) is named here, in one line, rather than by a safetensors traceback minutes later.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} is not a model folder or hub id "
            f"({one_line(exc, 200)})"
        ) from None
    check_weights(name_or_path)
    return config


def check_weights(folder: str | Path, key: str = "model.name_or_path") -> None:
    """A ConfigError naming the first ``*.safetensors`` file of a local folder that is damaged.

    A safetensors file is 8 bytes of header length, a JSON header giving each tensor's
    byte range, then the data; so the header alone says how long the file must be, and a
    copy cut short is found without reading a single tensor. Hub ids (not folders) pass.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        return
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(f"{key}: {weights} {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None when its size matches its header."""
    size = path.stat().st_size
    again = "an interrupted copy? copy the model folder again"
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or 8 + length > size:
            return f"is cut short ({size:,} bytes, its header is incomplete): {again}"
        try:
            header = json.loads(fh.read(length))
            end = max((int(t["data_offsets"][1]) for name, t in header.items()
                       if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a damaged header (not a safetensors file?)"
    expected = 8 + length + end
    if size < expected:
        return f"is cut short ({size:,} of the {expected:,} bytes its header lists): {again}"
    if size > expected:
        return f"is {size - expected:,} bytes longer than its header lists (damaged)"
    return None


def _concrete_class(auto_cls: Any, config: PretrainedConfig) -> type | None:
    """The class an Auto* class builds for ``config``; None for remote code or no mapping."""
    try:
        return auto_cls._model_mapping[type(config)]
    except KeyError:
        return None


def pretraining_class(config: PretrainedConfig, nsp: bool) -> type:
    """The Auto* class for the objective; ConfigError if the model lacks the head it needs."""
    if not nsp:
        remote = "AutoModelForMaskedLM" in (getattr(config, "auto_map", None) or {})
        if _concrete_class(AutoModelForMaskedLM, config) is None and not remote:
            raise ConfigError(
                f"model.name_or_path: {config.model_type!r} models have no masked-LM class in "
                "transformers: MLM pretraining needs an encoder (BERT, RoBERTa, DeBERTa, ...)"
            )
        return AutoModelForMaskedLM
    model_cls = _concrete_class(AutoModelForPreTraining, config)
    if model_cls is None or "next_sentence_label" not in inspect.signature(
            model_cls.forward).parameters:
        raise ConfigError(
            f"objective.nsp=true but {config.model_type!r} models have no NSP head "
            f"({getattr(model_cls, '__name__', 'no pretraining class')}); set objective.nsp=false"
        )
    return AutoModelForPreTraining


def position_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's positions allow; None where they set no limit.

    RoBERTa-style embeddings number positions from ``pad_token_id + 1`` (2 for RoBERTa), so
    ``max_position_embeddings - pad - 1`` tokens fit. DeBERTa-v3 (``position_biased_input:
    false``) has only bucketed relative positions: no table to overrun. ModernBERT's rotary
    positions have no table either; its ``max_position_embeddings`` is the trained context
    length, which is kept as the limit.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type == "deberta-v2" and not getattr(config, "position_biased_input", True):
        return None
    if config.model_type in _POSITION_OFFSET:
        pad = getattr(config, "pad_token_id", None)
        return limit - (pad + 1 if isinstance(pad, int) else _POSITION_OFFSET[config.model_type])
    return limit


def check_compatible(config: PretrainedConfig, tokenizer: Any, max_seq_length: int, *,
                     needs_mask: bool = True) -> None:
    limit = position_limit(config)
    if limit is not None and max_seq_length > limit:
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


def resolve_attn_implementation(config: PretrainedConfig, nsp: bool,
                                requested: str | None) -> str | None:
    """The attention kernel to ask for: ``requested``, but eager where sdpa is not supported.

    None (or "auto") lets transformers choose (sdpa where supported, else eager).
    """
    if not requested or requested == "auto":
        return None
    auto_cls = AutoModelForPreTraining if nsp else AutoModelForMaskedLM
    model_cls = _concrete_class(auto_cls, config)
    if requested == "sdpa" and model_cls is not None and not getattr(
            model_cls, "_supports_sdpa", False):
        logger.warning("%s has no sdpa attention: using eager (model.attn_implementation)",
                       model_cls.__name__)
        return "eager"
    return requested


def _build(make: Any, what: str) -> Any:
    """Run ``make()``, turning transformers' attention-choice errors and a weights file that
    does not load (damaged after :func:`check_weights` passed) into one-line ours."""
    from safetensors import SafetensorError

    try:
        return make()
    except SafetensorError as exc:
        raise ConfigError(f"model.name_or_path: the weights of {what} do not load "
                          f"({one_line(exc, 200)}): copy the model folder again") from None
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        raise SetupError(f"model.attn_implementation: {' '.join(str(exc).split())[:200]}"
                         ) from None
    except ValueError as exc:
        if "attention" not in str(exc).lower():
            raise
        raise ConfigError(f"model.attn_implementation: {what}: "
                          f"{' '.join(str(exc).split())[:200]}") from None


def load_pretraining_model(name_or_path: str | Path, config: PretrainedConfig, *, nsp: bool,
                           attn_implementation: str | None, trust_remote_code: bool
                           ) -> tuple[Any, list[str]]:
    """Load the weights; return the model and the names of its newly initialised heads.

    The heads are the parameters outside the encoder (``base_model``) that the
    checkpoint did not hold: a sentence-transformers, e5 or GTE folder has no MLM
    head, an ELECTRA discriminator no generator head. Tied weights (the MLM decoder
    shares the input embeddings) are loaded, so they are not among them.

    An ELECTRA *discriminator* checkpoint loaded as ``ElectraForMaskedLM`` is the common case:
    its generator head starts random, which the warning makes visible.
    """
    model_cls = pretraining_class(config, nsp)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                              "output_loading_info": True}
    attn = resolve_attn_implementation(config, nsp, attn_implementation)
    if attn:
        kwargs["attn_implementation"] = attn
    model, info = _build(lambda: model_cls.from_pretrained(str(name_or_path), **kwargs),
                         str(name_or_path))
    missing = set(info.get("missing_keys") or [])
    return model, new_head_parameters(model, missing)


def new_head_parameters(model: Any, missing: set[str]) -> list[str]:
    """Names (as ``named_parameters`` gives them) of head parameters among ``missing`` keys."""
    prefix = f"{model.base_model_prefix}."
    tensors = model.state_dict(keep_vars=True)
    new_ids = {id(tensors[k]) for k in missing if k in tensors and not k.startswith(prefix)}
    return [n for n, p in model.named_parameters() if id(p) in new_ids]


def new_pretraining_model(config: PretrainedConfig, *, nsp: bool,
                          attn_implementation: str | None) -> Any:
    """A randomly initialised model of ``config``'s architecture (any of the tested ones)."""
    model_cls = pretraining_class(config, nsp)
    attn = resolve_attn_implementation(config, nsp, attn_implementation)
    if attn:
        config._attn_implementation = attn
    return _build(lambda: model_cls.from_config(config), config.model_type)


def save_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """A standard HF folder: safetensors weights + config + tokenizer.

    The Trainer adds the base's sentence-transformers modules to every folder it saves
    (:func:`write_st_modules`), this one included.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- sentence-transformers modules
#: sentence-transformers' own files at a model folder's top level (README.md, the model card,
#: describes the base and is not carried).
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def st_modules(name_or_path: str | None) -> dict[str, bytes]:
    """The sentence-transformers module files of a base model, by relative path; {} for none.

    ``modules.json`` lists the modules ``SentenceTransformer`` chains: the transformer at
    the folder's top level (path ``""``, the weights further_pt trains), then pooling,
    normalisation, dense layers... each in its own folder (``1_Pooling/``). Those folders and
    the top-level ST_FILES are read here (a hub id from the hub's cache or the hub) to be
    written into every folder the run saves (:func:`write_st_modules`). A base whose
    transformer lives in a subfolder (the old ``0_Transformer/`` layout) cannot be carried:
    the saved weights are at the top level. Logged either way.
    """
    if name_or_path is None:
        return {}
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        folder = _hub_st_folder(name_or_path)
        if folder is None:
            return {}
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return {}
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        paths = [str(m.get("path", "")) for m in modules]
    except (ValueError, AttributeError, TypeError) as exc:  # not ours to refuse: warn
        logger.warning("%s is not a valid modules.json (%s): sentence-transformers modules are "
                       "not carried into the saved folders", modules_path, one_line(exc, 200))
        return {}
    if "" not in paths:
        logger.warning("%s keeps its transformer in a subfolder (%s): its sentence-transformers "
                       "modules are not carried into the saved folders", name_or_path,
                       ", ".join(paths))
        return {}
    files = {name: (folder / name).read_bytes() for name in ST_FILES if (folder / name).is_file()}
    for sub in (p for p in paths if p):
        files[f"{sub}/"] = b""  # the folder itself: Normalize has no file, yet is listed
        for path in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else ():
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = path.read_bytes()
    logger.info("sentence-transformers modules of %s (%s) are carried into every saved folder",
                name_or_path, ", ".join(f"{m.get('path') or '.'}: {m.get('type', '?')}"
                                        for m in modules))
    return files


def _hub_st_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub model's sentence-transformers files; None when it has none
    (or they cannot be had: offline and not in the cache, where the run then saves without)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        modules = json.loads(Path(hf_hub_download(repo_id, "modules.json")).read_text())
        subfolders = [f"{m['path']}/*" for m in modules if m.get("path")]
        return Path(snapshot_download(repo_id, allow_patterns=[*ST_FILES, *subfolders]))
    except Exception as exc:  # no such file, offline, gated: the run goes on without them
        logger.info("no sentence-transformers modules for %s (%s)", repo_id, one_line(exc, 200))
        return None


def write_st_modules(files: dict[str, bytes], folder: Path) -> None:
    """Write :func:`st_modules`'s files into a saved model folder (nothing for {})."""
    for rel, data in files.items():
        path = folder / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def encoder_flops_per_token(config: Any, seq_len: int, *, head_fraction: float = 0.0) -> float:
    """Training FLOPs per token of a BERT-style encoder (forward + backward = 3 x forward).

    ``6 * N + 12 * L * H * S`` as in nanoGPT's ``estimate_mfu`` (from the PaLM paper,
    appendix B): N = non-embedding parameters of the encoder layers (attention
    Q/K/V/output, feed-forward, LayerNorms, biases included; word/position/type
    embeddings excluded, they are lookups), L layers, H hidden size, S = ``seq_len``
    (the attention scores and mixing, which grow with sequence length).
    ``head_fraction`` adds the MLM head's matmuls, ``6 * (H*H + H*V)``, for that fraction
    of tokens: 0 for the encoder alone, the masked share (~0.15) for a head that scores
    masked positions only, 1 for a head that scores every position.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or 4 * h
    per_layer = (4 * (h * h + h)        # query, key, value, attention output dense
                 + h * inter + inter    # intermediate dense
                 + inter * h + h        # output dense
                 + 2 * 2 * h)           # two LayerNorms (weight + bias)
    flops = 6 * layers * per_layer + 12 * layers * h * seq_len
    return float(flops + 6 * (h * h + h * config.vocab_size) * head_fraction)
