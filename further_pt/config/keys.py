"""The recipe keys and their comments: the source of the documentation's key reference.

Every default lives in a recipe (``recipes/base/*.yaml``), and every key there carries a
comment that says what it does. The documentation's "Recipe keys" page is generated from
those comments (``docs/hooks/recipe_keys.py`` calls :func:`reference_markdown` at every
site build), so the reference cannot drift from the recipes the code reads, and
``tests/test_docs.py`` fails on a key without a comment.

PyYAML drops comments, so the recipe text is read line by line, tracking indentation, for
the subset of YAML the recipes are written in: block mappings, one-line scalars and flow
collections, block sequences and block scalars. What the parser finds is checked against
``yaml.safe_load`` of the same text: a key it missed or invented is a ``ValueError`` naming
the file and the key, never a silently wrong page.

A key's comment is the trailing ``# ...`` on its line, plus the comment-only lines right
below it whose ``#`` stands to the right of the key (by convention at the same column as
the first ``#``)::

    extend_vocab: null    # or {max_new_tokens: 2000, min_frequency: 50}: frequent corpus
                          # words the tokenizer splits become tokens (mean-initialised)

A comment-only line above a key, or one indented no deeper than the key, is not the key's.
This module imports nothing from further_pt (the standard library and PyYAML only), so the
documentation build can run it without torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Key", "comments", "read_keys", "undocumented"]

# A mapping key at the start of a line (after its indentation): a plain word or a quoted
# string, then a colon followed by a space or the end of the line.
_KEY = re.compile(r"""(?P<key>[^\s#'"\-\[\]{},:][^:#]*?|"[^"]*"|'[^']*')\s*:(?=\s|$)""")


@dataclass(frozen=True)
class Key:
    """One key of a recipe, as written.

    ``path`` is dotted from the top (``data.train_files``); ``value`` is the text after the
    colon, without its comment (a block sequence is shown in flow style, ``[a, b]``; a
    mapping header's value is empty); ``comment`` joins the key's comment lines with spaces.
    """

    path: str
    value: str
    comment: str
    mapping: bool = False  # a block header whose keys follow (head_warmup:)
    line: int = 0  # 1-based line of the key in its file

    @property
    def depth(self) -> int:
        """0 for a top-level key (``seed``, ``train``), 1 for ``train.lr``, ..."""
        return self.path.count(".")


@dataclass
class _Line:
    number: int  # 1-based
    text: str  # without the line break
    indent: int  # leading spaces
    blank: bool
    comment_only: bool


def _lines(text: str) -> list[_Line]:
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: a tab in the indentation (YAML allows spaces only)")
        stripped = raw.strip()
        out.append(_Line(number, raw.rstrip(), len(raw) - len(raw.lstrip(" ")), not stripped,
                         stripped.startswith("#")))
    return out


def _split_comment(text: str, start: int) -> tuple[str, str | None, int]:
    """Split ``text[start:]`` into the value and its trailing comment (None when there is none).

    A ``#`` starts a comment only outside quotes and after whitespace, as in YAML, so
    ``"a#b"`` and ``x#y`` stay values. Returns the value, the comment text (after ``#`` and
    spaces) and the absolute column of the ``#`` (-1 without a comment).
    """
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if quote == '"' and ch == "\\":
                i += 1  # an escaped character inside double quotes
            elif ch == quote:
                quote = None
        elif ch in "\"'" and (i == start or text[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == start or text[i - 1] in " \t"):
            return text[start:i].strip(), text[i + 1 :].strip(), i
        i += 1
    return text[start:].strip(), None, -1


def _comment_text(line: _Line) -> tuple[str, int]:
    col = line.text.index("#")
    return line.text[col + 1 :].strip(), col


def _flow(value: Any) -> str:
    """A loaded value written back in YAML's flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _balanced(text: str) -> bool:
    """Whether every ``[`` and ``{`` of a flow collection is closed (quotes respected)."""
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote is not None:
            if ch == quote and (quote == "'" or text[i - 1] != "\\"):
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth <= 0


def _scan(text: str) -> list[Key]:
    """The keys of ``text`` in file order, with their values and comments (no cross-check)."""
    lines = _lines(text)
    keys: list[Key] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the open block mappings
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.blank or line.comment_only or line.text.strip() in ("---", "..."):
            i += 1
            continue
        match = _KEY.match(line.text, line.indent)
        if match is None:
            raise ValueError(f"line {line.number}: expected `key: value` here, found "
                             f"{line.text.strip()!r}")
        name = match["key"].strip()
        if name[0] in "\"'":
            name = name[1:-1]
        while parents and parents[-1][0] >= line.indent:
            parents.pop()
        path = ".".join([p for _, p in parents] + [name])
        value, comment, _ = _split_comment(line.text, match.end())
        i += 1

        # The comment's continuation lines: comment-only, right below, right of the key.
        comments = [comment] if comment is not None else []
        if comment is not None:
            while i < len(lines) and lines[i].comment_only:
                more, col = _comment_text(lines[i])
                if col <= line.indent + len(name):
                    break
                comments.append(more)
                i += 1
        joined = " ".join(c for c in comments if c)

        nxt = next((n for n in lines[i:] if not n.blank and not n.comment_only), None)
        item_next = nxt is not None and (nxt.text.lstrip().startswith("- ")
                                         or nxt.text.strip() == "-")
        if value == "" and item_next and nxt.indent >= line.indent:
            # A block sequence: its items, at one indentation, each `- item`.
            items, item_indent = [], nxt.indent
            while i < len(lines):
                cur = lines[i]
                if cur.blank or cur.comment_only:
                    i += 1
                    continue
                if cur.indent == item_indent and cur.text.lstrip().startswith("-"):
                    item, _, _ = _split_comment(cur.text, cur.indent + 1)
                    items.append(item)
                    i += 1
                elif cur.indent > item_indent:
                    raise ValueError(f"line {cur.number}: a nested block inside the list "
                                     f"`{path}`; write the list in flow style ([...])")
                else:
                    break
            keys.append(Key(path, "[" + ", ".join(items) + "]", joined, line=line.number))
        elif value == "" and nxt is not None and nxt.indent > line.indent:
            keys.append(Key(path, "", joined, mapping=True, line=line.number))
            parents.append((line.indent, name))
        elif value[:1] in ("|", ">"):
            # A block scalar: every following line indented deeper (or blank) is its text.
            body = []
            while i < len(lines) and (lines[i].blank or lines[i].indent > line.indent):
                body.append(lines[i].text.strip())
                i += 1
            keys.append(Key(path, " ".join(b for b in body if b), joined, line=line.number))
        else:
            # A flow collection may continue over several lines until its brackets close.
            while value[:1] in ("[", "{") and not _balanced(value) and i < len(lines):
                more, _, _ = _split_comment(lines[i].text, 0)
                value = f"{value} {more}"
                i += 1
            loaded = yaml.safe_load(value) if value[:1] == "{" else None
            if isinstance(loaded, dict) and loaded:
                # A flow mapping: its keys are keys of the recipe too (without comments of
                # their own: write the mapping as a block to give each key its comment).
                keys.append(Key(path, "", joined, mapping=True, line=line.number))
                keys.extend(_flow_keys(loaded, path, line.number))
            else:
                keys.append(Key(path, value, joined, line=line.number))
    return keys


def _flow_keys(mapping: dict[Any, Any], prefix: str, number: int) -> Iterator[Key]:
    for k, v in mapping.items():
        path = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            yield Key(path, "", "", mapping=True, line=number)
            yield from _flow_keys(v, path, number)
        else:
            yield Key(path, _flow(v), "", line=number)


def _leaves(data: Any, prefix: str = "") -> Iterator[str]:
    """The dotted paths of a loaded YAML document's leaves (a list is one leaf)."""
    if isinstance(data, dict) and (data or not prefix):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


def read_keys(text: str, source: str = "<recipe>") -> list[Key]:
    """Every key of a recipe's text, in file order: its dotted path, value and comment.

    Mapping headers are keys too (``mapping=True``). Raises ``ValueError`` naming ``source``
    and the key when the keys found differ from ``yaml.safe_load``'s leaves, so a recipe
    written in YAML this parser does not follow fails loudly instead of losing a key.
    """
    try:
        keys = _scan(text)
        data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{source}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe is a mapping of keys, not {type(data).__name__}")
    paths = [k.path for k in keys]
    for path in paths:
        if paths.count(path) > 1:
            raise ValueError(f"{source}: key {path} is written twice")
    found = {k.path for k in keys if not k.mapping}
    loaded = set(_leaves(data))
    for path in sorted(loaded - found):
        raise ValueError(f"{source}: key {path} is in the YAML but the comment reader missed "
                         "it; write it as the recipes do (one `key: value` per line)")
    for path in sorted(found - loaded):
        raise ValueError(f"{source}: key {path} was read but is not a key of the YAML "
                         "(yaml.safe_load); write it as the recipes do")
    return keys


def undocumented(text: str, source: str = "<recipe>") -> list[str]:
    """The dotted paths of the keys of ``text`` that have no comment.

    Every value key needs one, and so does a block header below the top level
    (``objective.head_warmup``): its comment is the only place that says what the block is
    for. A top-level section (``model:``, ``train:``) is named by its keys and needs none.
    """
    return [k.path for k in read_keys(text, source)
            if not k.comment and (not k.mapping or k.depth > 0)]


# -- the reference page -------------------------------------------------------------------

# Pretraining first: the reference follows the order of the guides.



def base_of(keys: list[Key]) -> str | None:
    """The base recipe a recipe starts from (``base/pretrain``), from its ``defaults:``."""
    for key in keys:
        if key.path == "defaults":
            for item in key.value.strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("base/"):
                    return item.split("@")[0]
    return None


def comments(recipe: Path) -> dict[str, str]:
    """Each key's comment as ``further-pt config`` shows it: the recipe's own comment where
    it sets the key (why it differs), else its base's (what the key does)."""
    keys = read_keys(recipe.read_text(), str(recipe))
    found: dict[str, str] = {}
    base = base_of(keys)
    if base is not None:
        root = recipe.parent
        while not (root / f"{base}.yaml").is_file() and root != root.parent:
            root = root.parent
        if (root / f"{base}.yaml").is_file():
            found.update(comments(root / f"{base}.yaml"))
    found.update({k.path: " ".join(k.comment.split()) for k in keys if k.comment})
    return found
