"""Domain vocabulary extension: frequent corpus words the tokenizer splits become new tokens.

Further pretraining on a domain corpus (google-research/bert#9, transformers#1413)
often meets words the general vocabulary cuts into pieces ("nephrectomy" ->
"ne ##ph ##rec ##tomy"): they cost sequence length and their meaning must be
assembled from unrelated pieces. ``model.extend_vocab`` adds the most frequent
such words as whole tokens and starts each new embedding at the mean of its
pieces' embeddings, so the model's first guess for the new token is what it
already computed from the pieces (rather than noise that MLM must first unlearn).

The flow, on the main process before instances are built::

    words = choose_words(texts, tok, max_new_tokens=n, min_frequency=f)
    new_tok = extend_tokenizer(tok, words)
    extend_model(model, tok, new_tok, words)   # once the model is loaded

``choose_words`` sees words exactly as the tokenizer does (its own normalizer and
pre-tokenizer), so lowercasing, accent stripping and punctuation splitting follow
the model, and the chosen words are the ones the tokenizer will really meet.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tqdm.auto import tqdm

from further_pt.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["choose_words", "extend_model", "extend_tokenizer", "tokens_per_document"]

# Characters stripped from a pre-tokenized word to get the surface word an added token matches:
# whitespace kept by some pre-tokenizers and SentencePiece's word-boundary mark.
_BOUNDARY = " \t\r\n\u2581"


def _is_word(surface: str) -> bool:
    """The skip rule: a candidate must contain at least one letter.

    Pure numbers ("2019", "3.14"), punctuation runs ("---") and symbols are left
    to the existing pieces: they are open-ended (every year, every measurement),
    their meaning is carried by their digits, and a vocabulary slot spent on one
    of them would rarely be reused. Mixed forms such as "covid19" or "il-6"'s
    "il" stay eligible.
    """
    return any(ch.isalpha() for ch in surface)


def choose_words(texts: Iterable[str], tokenizer: Any, *, max_new_tokens: int,
                 min_frequency: int, progress: bool = True) -> list[tuple[str, list[str], int]]:
    """The words to add: ``(word, its current pieces, frequency)``, most frequent first.

    ``texts`` is streamed once (only the word counts are held, not the corpus).
    Words are what the tokenizer's own normalizer and pre-tokenizer produce; a
    word qualifies when the current model splits it into >= 2 pieces, none of
    them the unknown token, it occurs >= ``min_frequency`` times, and it has a
    letter (see :func:`_is_word`). Ties in frequency are broken by the word, so
    the result is the same on every run and every process.
    """
    for key, value in (("max_new_tokens", max_new_tokens), ("min_frequency", min_frequency)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.extend_vocab.{key}={value!r}: must be an integer >= 1")
    backend = tokenizer.backend_tokenizer
    normalizer = backend.normalizer
    pre_tokenizer = backend.pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    counts: Counter[str] = Counter()  # pre-tokenized form -> occurrences
    surface_of: dict[str, str] = {}   # pre-tokenized form ("Ġkernel") -> surface ("kernel")
    for text in tqdm(texts, desc="counting words", unit=" docs", disable=not progress,
                     mininterval=2.0):
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        for form, (start, end) in pre_tokenizer.pre_tokenize_str(normalized):
            counts[form] += 1
            if form not in surface_of:
                surface_of[form] = normalized[start:end].strip(_BOUNDARY)

    # Several forms can share a surface (byte-level BPE: "kernel" at the start of a text,
    # "Ġkernel" after a space): their counts add up. The pieces are those the new token
    # replaces: for WordPiece the word's own (it joins the vocabulary); for BPE/Unigram the
    # surface's alone, since an added token is cut out of the text before pre-tokenization
    # and a byte-level "Ġ" or SentencePiece "▁" boundary mark stays outside it.
    model = backend.model
    unk = getattr(model, "unk_token", None)
    wordpiece = isinstance(model, models.WordPiece)
    best: dict[str, tuple[int, str]] = {}
    total: Counter[str] = Counter()
    for form, n in counts.items():
        surface = surface_of[form]
        if not surface or not _is_word(surface):
            continue
        total[surface] += n
        if surface not in best or (n, form) > best[surface]:
            best[surface] = (n, form)
    chosen: list[tuple[str, list[str], int]] = []
    for surface in sorted(total, key=lambda w: (-total[w], w)):
        if total[surface] < min_frequency or len(chosen) >= max_new_tokens:
            break
        seen = [t.value for t in model.tokenize(best[surface][1])]  # as met in the corpus
        pieces = seen if wordpiece else backend.encode(surface, add_special_tokens=False).tokens
        if (len(seen) >= 2 and unk not in seen and pieces and unk not in pieces
                and tokenizer.convert_tokens_to_ids(surface) in (None, tokenizer.unk_token_id)):
            chosen.append((surface, pieces, total[surface]))
    return chosen


def _reload(tokenizer: Any, edit_json: Any = None) -> Any:
    """A fresh copy of ``tokenizer`` rebuilt the way ``from_pretrained`` builds it.

    Saving and loading back goes through the same path a resumed run or a
    fine-tuning job takes (in transformers v5 a class such as ``BertTokenizer``
    rebuilds its backend from the ``tokenizer.json`` vocabulary plus its own
    normalizer settings), so the tokenizer returned here behaves exactly like the
    one that will later be read from the run's folder. ``edit_json`` may change
    the parsed ``tokenizer.json`` in between.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if edit_json is not None:
            path = Path(tmp) / "tokenizer.json"
            spec = json.loads(path.read_text(encoding="utf-8"))
            edit_json(spec)
            path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
            (Path(tmp) / "vocab.txt").unlink(missing_ok=True)  # tokenizer.json is the truth
        new = type(tokenizer).from_pretrained(tmp)
    new.name_or_path = tokenizer.name_or_path
    return new


def extend_tokenizer(tokenizer: Any, words: Iterable[tuple[str, list[str], int]] | Iterable[str]
                     ) -> Any:
    """A new tokenizer whose vocabulary also holds ``words`` (ids appended in the given order).

    WordPiece: each word joins the WordPiece model's own vocabulary. It is then a
    real vocabulary word: greedy longest-match uses it inside longer words too
    ("kernel" makes "kernels" -> "kernel ##s"), and it never matches in the middle
    of another word, which an added token would ("kernel" inside "subkernel").
    BPE and Unigram: a word in the vocabulary alone would never be produced (BPE
    only reaches tokens through its merge list, Unigram through its scores), so
    the words are added as added tokens matched as whole words
    (``single_word=True``) on normalized text. ``tokenizer`` is not modified.

    Raises ``ValueError`` if a word does not afterwards encode as exactly one token.
    """
    names = [w if isinstance(w, str) else w[0] for w in words]
    if len(set(names)) != len(names):
        raise ValueError("extend_tokenizer: the words to add contain duplicates")
    if not names:
        return _reload(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] == "WordPiece":
        # After the largest id in use, added tokens included, so no id is shared.
        next_id = 1 + max([*spec["model"]["vocab"].values(),
                           *(t["id"] for t in spec["added_tokens"])])

        def add_to_vocab(data: dict) -> None:
            vocab = data["model"]["vocab"]
            for i, word in enumerate(names):
                if word in vocab:
                    raise ValueError(f"extend_tokenizer: {word!r} is already in the vocabulary")
                vocab[word] = next_id + i
        new = _reload(tokenizer, add_to_vocab)
    else:
        new = _reload(tokenizer)
        new.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in names])
    for word in names:
        ids = new(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] != new.convert_tokens_to_ids(word):
            raise ValueError(f"extend_tokenizer: {word!r} still encodes as "
                             f"{new.convert_ids_to_tokens(ids)} after extension")
    logger.info("vocabulary extended by %d words (%d -> %d tokens)", len(names), len(tokenizer),
                len(new))
    return new


def _head_biases(model: Any, output: torch.nn.Module | None, rows: int) -> list[torch.Tensor]:
    """The distinct vocabulary-sized bias parameters of the MLM head, grown to ``rows``.

    ``output.bias`` is what the forward pass adds; BERT and RoBERTa heads also
    hold a ``bias`` attribute of their own, usually the same tensor (tied) but a
    separate parameter when ``tie_word_embeddings=False``. Two gaps of
    ``resize_token_embeddings`` (transformers 5.x) are mended here, since either
    makes the saved folder load wrongly: RoBERTa's untied ``lm_head.bias`` keeps the
    old size (size mismatch on load), and BERT's ``set_output_embeddings`` makes an
    untied head's ``bias`` the decoder's own tensor, so ``save_pretrained`` stores
    the shared tensor once and the reloaded decoder bias comes back as zeros.
    """
    if output is None:
        return []
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", True)
    found: list[torch.Tensor] = []
    out_bias = getattr(output, "bias", None)
    candidates = [out_bias]
    for module in model.modules():
        if not any(child is output for child in module.children()):
            continue
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.nn.Parameter) or bias.dim() != 1:
            continue
        if bias.shape[0] < rows:  # stale size: pad (the means are written below)
            grown = torch.zeros(rows, dtype=bias.dtype, device=bias.device)
            grown[: bias.shape[0]] = bias.detach()
            bias = module.bias = torch.nn.Parameter(grown, requires_grad=bias.requires_grad)
        elif bias is out_bias and not tied:  # untied: a tensor of its own again, as at init
            bias = module.bias = torch.nn.Parameter(bias.detach().clone(),
                                                    requires_grad=bias.requires_grad)
        candidates.append(bias)
    for bias in candidates:
        if (isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == rows
                and not any(bias is b for b in found)):
            found.append(bias)
    return found


def extend_model(model: Any, old_tokenizer: Any, new_tokenizer: Any,
                 words_with_pieces: Iterable[tuple[str, list[str], int]], *,
                 pad_to_multiple_of: int | None = None) -> None:
    """Grow the model's vocabulary to ``new_tokenizer`` and start new tokens at their pieces' mean.

    For each new word: input embedding row = mean of its old pieces' rows; MLM
    output bias = mean of the pieces' biases; an untied output matrix gets the
    same treatment. Tied weights stay tied (``resize_token_embeddings`` re-ties).
    ``mean_resizing=False``: the transformers default samples the new rows from the
    old rows' covariance, work that is wasted since every new row is overwritten
    (rows added only by ``pad_to_multiple_of`` keep the config's normal init).
    """
    words = list(words_with_pieces)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(old_tokenizer) > old_rows:
        raise ValueError(f"extend_model: the old tokenizer has {len(old_tokenizer)} tokens but "
                         f"the model's embeddings only {old_rows}")
    plan: list[tuple[int, list[int]]] = []
    for word, pieces, _ in words:
        new_id = new_tokenizer.convert_tokens_to_ids(word)
        piece_ids = old_tokenizer.convert_tokens_to_ids(pieces)
        if new_id is None or new_id < len(old_tokenizer) or new_id == new_tokenizer.unk_token_id:
            raise ValueError(f"extend_model: {word!r} is not a new token of new_tokenizer")
        if not pieces or any(i is None or i >= old_rows or i == old_tokenizer.unk_token_id
                             for i in piece_ids):
            raise ValueError(f"extend_model: pieces {pieces} of {word!r} are not all known to "
                             "the old tokenizer")
        plan.append((new_id, piece_ids))

    model.resize_token_embeddings(max(len(new_tokenizer), old_rows),
                                  pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    rows = embeddings.shape[0]
    output = model.get_output_embeddings()
    matrices = [embeddings]
    out_weight = getattr(output, "weight", None)
    if (out_weight is not None and out_weight is not embeddings
            and tuple(out_weight.shape) == tuple(embeddings.shape)):
        matrices.append(out_weight)  # untied decoder: (vocab, hidden) like the embeddings
    with torch.no_grad():
        for tensor in [*matrices, *_head_biases(model, output, rows)]:
            means = [tensor[ids].float().mean(0).to(tensor.dtype) for _, ids in plan]
            for (new_id, _), mean in zip(plan, means, strict=True):
                tensor[new_id] = mean


def tokens_per_document(texts: Iterable[str], tokenizer: Any, *, batch_size: int = 256) -> float:
    """Mean number of tokens per document, without special tokens (0.0 for no documents).

    Compared before and after :func:`extend_tokenizer` it shows how much shorter
    the domain text became; ``texts`` is streamed in batches.
    """
    it = iter(texts)
    docs = tokens = 0
    while batch := list(islice(it, batch_size)):
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        docs += len(batch)
        tokens += sum(len(ids) for ids in encoded)
    return tokens / docs if docs else 0.0
