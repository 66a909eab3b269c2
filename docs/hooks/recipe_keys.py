"""mkdocs hook: the "Recipe keys" page, generated from the recipes' own comments.

``docs/reference/recipe-keys.md`` holds only a placeholder (what GitHub shows); at every
build the text between its markers is replaced with :func:`reference_markdown` of
``recipes/``, so the reference is never written by hand and cannot drift from the recipes
the code reads. ``mkdocs serve`` also watches ``recipes/``, so a changed comment shows at
once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from further_pt.config.reference import reference_markdown

PAGE = "reference/recipe-keys.md"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
_PLACEHOLDER = re.compile(r"<!-- recipe-keys:start -->.*?<!-- recipe-keys:end -->", re.DOTALL)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    """Replace the placeholder of the reference page with the generated reference."""
    if page.file.src_uri != PAGE:
        return markdown
    if not _PLACEHOLDER.search(markdown):
        raise ValueError(f"{PAGE} lost its <!-- recipe-keys:start/end --> placeholder")
    generated = reference_markdown(RECIPES)
    return _PLACEHOLDER.sub(lambda _: generated, markdown, count=1)


def on_serve(server: Any, *, config: Any, builder: Any) -> Any:
    """Rebuild when a recipe changes, as for a page."""
    server.watch(str(RECIPES))
    return server
