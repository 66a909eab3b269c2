"""Files: writes a crash cannot leave half-done.

Every JSON or YAML file a run writes beside its weights (config.yaml, metrics.json,
trainer_state.json, the head warm-up plan, the vocabulary chosen) goes through
:func:`atomic_write_text`: a reader sees the old file or the new one, never a cut one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_lines(path, [text])


def atomic_write_lines(path: Path, parts: Iterable[str]) -> None:
    """Write ``parts`` (streamed: a corpus need not fit in memory) to a temporary file beside
    ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(parts)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
