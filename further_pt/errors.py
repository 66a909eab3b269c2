"""Errors: what can go wrong, named by what it is, each with the exit code a shell sees.

The bottom of the package: it imports nothing from further_pt, and every stage
may raise these. The entry points (``pretrain.py``, ``finetune.py``, the CLI)
turn them into one line on stderr and the exit code below, so a job scheduler
can tell "fix your input" (2) from "training broke" (3) from "preempted, run
again" (75).

=====================  ====  =====================================================
exception              exit  meaning
=====================  ====  =====================================================
:class:`InvalidInput`   2    found before any long work; nothing was written
:class:`ConfigError`    2    a recipe, key, override or value (names the key)
:class:`DataError`      2    a data file's content (names file, row, column, value)
:class:`SetupError`     2    the environment: disk, processes, a locked output dir
:class:`TrainingFailed` 3    training cannot go on; the last checkpoint is kept
:class:`CheckpointWriteError` 3  a checkpoint could not be written; the previous is intact
:class:`Preempted`      75   SIGTERM/SIGINT: checkpointed; run the same command again
=====================  ====  =====================================================
"""

from __future__ import annotations

__all__ = ["EXIT_CODES", "CheckpointWriteError", "ConfigError", "DataError", "FurtherPTError",
           "InvalidInput", "Preempted", "SetupError", "TrainingFailed"]


class FurtherPTError(Exception):
    """Base of the errors the entry points turn into an exit code."""

    exit_code = 1


class InvalidInput(FurtherPTError, ValueError):
    """Bad input found before any long work. The message is one line naming the culprit."""

    exit_code = 2


class ConfigError(InvalidInput):
    """A bad recipe, override, path or value. The message names the key or the file."""


class DataError(InvalidInput):
    """A data file holds something unusable. The message names the file, row, column, value."""


class SetupError(InvalidInput):
    """The environment cannot run this job: disk space, process count, a locked output dir."""


class TrainingFailed(FurtherPTError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last checkpoint is kept."""

    exit_code = 3


class CheckpointWriteError(TrainingFailed):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class Preempted(FurtherPTError, RuntimeError):
    """SIGTERM/SIGINT arrived: the step was finished and checkpointed; re-run to resume."""

    exit_code = 75


EXIT_CODES = {"invalid input": InvalidInput.exit_code, "training failed": TrainingFailed.exit_code,
              "preempted": Preempted.exit_code}


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """An exception's text on one line (tracebacks and YAML errors span several), cut to
    ``limit`` characters: an error message names the problem in one line."""
    text = " ".join(str(exc).split())
    return text if limit is None else text[:limit]
