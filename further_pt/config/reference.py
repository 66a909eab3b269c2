"""Reference: the documentation's "Recipe keys" page, made from the recipes' own comments
(:mod:`.keys`) at every site build, so it cannot drift from the recipes the code reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from further_pt.config.keys import Key, base_of, read_keys

_BASE_ORDER = ("base/pretrain", "base/finetune")
_MD_SPECIAL = re.compile(r"([\\*_\[\]|<>])")



def _md_text(text: str) -> str:
    """Comment text as Markdown inline text: code spans kept, everything else literal."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        parts = [text]
    out = []
    for n, part in enumerate(parts):
        if n % 2:
            out.append(_md_code(part))
        else:
            out.append(_MD_SPECIAL.sub(lambda m: "&lt;" if m[1] == "<" else (
                "&gt;" if m[1] == ">" else "\\" + m[1]), part))
    return "".join(out)


def _html(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "&#124;"))


def _md_code(value: str) -> str:
    """A value as a code span that is safe inside a table cell."""
    if not value:
        return ""
    if "|" in value or "`" in value:
        return f"<code>{_html(value)}</code>"
    return f"`{value}`"


def _header(text: str) -> tuple[list[str], list[str]]:
    """A recipe's leading comment: its prose lines and its command lines (``#   cmd``)."""
    prose: list[str] = []
    commands: list[str] = []
    for raw in text.splitlines():
        if not raw.startswith("#"):
            break
        body = raw[1:]
        if body.startswith("   ") and body.strip():
            commands.append(body[3:].rstrip())
        elif body.strip():
            prose.append(body.strip())
    return prose, commands


def _section(name: str, rel: str, text: str, keys: list[Key], base: str | None) -> list[str]:
    prose, commands = _header(text)
    out = [f"## {name}", "", f"`{rel}`" + (f", starting from `{base}`: only the keys it sets."
                                           if base else ": every key.")]
    if prose:
        out += ["", _md_text(" ".join(prose))]
    if commands:
        out += ["", "```bash", *commands, "```"]
    out += ["", "| key | value | what it does |", "|---|---|---|"]
    for key in keys:
        if key.mapping and not key.comment:
            continue  # a top-level section without a comment: its keys say it all
        out.append(f"| `{key.path}` | {_md_code(key.value)} | {_md_text(key.comment)} |")
    return [*out, ""]


def reference_markdown(recipes_dir: Path) -> str:
    """The "Recipe keys" page: one section per recipe, a table of key, value and comment.

    The base recipes (``recipes/base/``) list every key; each other recipe lists only the
    keys it sets, under the base it starts from. Order: ``base/pretrain`` and the recipes
    built on it, ``base/finetune`` and its recipes, then the rest (``paper_grid``).
    """
    recipes_dir = Path(recipes_dir)
    read = {}
    for path in sorted(recipes_dir.rglob("*.yaml")):
        rel = path.relative_to(recipes_dir).with_suffix("").as_posix()
        text = path.read_text(encoding="utf-8")
        read[rel] = (text, read_keys(text, str(path)))
    bases = sorted((r for r in read if r.startswith("base/")),
                   key=lambda r: (r not in _BASE_ORDER, _BASE_ORDER.index(r)
                                  if r in _BASE_ORDER else 0, r))
    order: list[str] = []
    for base in bases:
        order.append(base)
        order += sorted(r for r in read if base_of(read[r][1]) == base)
    order += sorted(r for r in read if r not in order)

    lines = [
        "# Recipe keys",
        "",
        "Every default lives in a recipe, and every key of a recipe says what it does in the "
        "comment beside it. This page is generated from those comments "
        "(`further_pt/config/keys.py`) whenever the site is built, so it always matches the "
        "recipes the code reads; `further-pt config recipe=NAME` prints a recipe composed "
        "with its base and your overrides.",
        "",
        "Recipes: " + ", ".join(f"[{r}](#{r.replace('/', '')})" for r in order) + ".",
        "",
    ]
    for rel in order:
        text, keys = read[rel]
        base = base_of(keys)
        lines += _section(rel, f"recipes/{rel}.yaml", text, keys, base)
    return "\n".join(lines)
