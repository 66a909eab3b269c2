"""Built-in corpora (``builtin:NAME`` in ``data.train_files``): text that every Python
install has, so the demo and the tests run with no download.

``builtin:python-docstrings`` is the docstrings of the installed standard library, written
once to a text file (one document a line) under the cache dir.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from pathlib import Path

from further_pt.config.recipes import ConfigError


def builtin_corpus(name: str, cache_dir: Path) -> Path:
    """Materialise a built-in corpus as a text file (one document per line) and return its path."""
    if name != "python-docstrings":
        raise ConfigError(f"data.train_files: unknown built-in corpus {name!r} "
                          "(available: builtin:python-docstrings)")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idlelib" not in p.parts)
    key = hashlib.sha256("\n".join(str(p) for p in files).encode()).hexdigest()[:16]
    out = cache_dir / f"python-docstrings-{key}.txt"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for path in files:
            for doc in _docstrings(path):
                fh.write(doc + "\n")
    os.replace(tmp, out)
    return out


def _docstrings(path: Path) -> list[str]:
    """Docstrings of a module, its classes and functions, each flattened to one line."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                flat = " ".join(doc.split())
                if len(flat.split()) >= 8:  # one-liners teach little about NSP
                    found.append(flat)
    return found
