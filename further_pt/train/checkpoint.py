"""Checkpoint: the one save/resume core of pretraining and fine-tuning.

A checkpoint is a folder ``<output_dir>/checkpoints/step-NNNNNN/`` holding

- a Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer
  files) that ``AutoModel*.from_pretrained`` loads directly: the weights are
  stored once, here, and resuming reads them back from the same file;
- ``optimizer.pt`` and ``scheduler.pt`` (plain tensors and numbers, loaded with
  ``torch.load(weights_only=True)``: no pickle code runs on resume);
- ``trainer_state.json``: the step, the data position and counters;
- ``manifest.json``, written last: size and SHA-256 of every other file. A
  folder is *complete* only with a manifest that matches its files.

Writes are atomic: everything goes to ``.tmp-step-NNNNNN`` and is renamed into
place after an fsync, so a crash mid-write leaves the previous checkpoint as
the newest complete one. RNG state is not saved because the loops reseed every
step from (seed, step, rank): the randomness of step *k* is the same whether
the run was resumed or not.

Under data parallelism (DDP) optimizer state is replicated on every rank, so the main
process writes it and every rank reads it. Under FSDP the main process writes the gathered
full state and alone reads it back; the others receive their shards from it
(:meth:`further_pt.train.export.Exporter.load_optimizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from further_pt.errors import CheckpointWriteError, SetupError
from further_pt.files import atomic_write_text
from further_pt.train import faults

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------- output dir


# --------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def save_model_folder(folder: Path, write_model: Callable[[Path], None]) -> None:
    """Write a HF model folder atomically (``final/``): temp folder, manifest, fsync, rename."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_model(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write {folder} ({exc.strerror or exc}); earlier checkpoints are intact"
        ) from exc
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def folder_of(root: Path, step: int) -> Path:
    """The checkpoint folder of ``step``: ``root/step-NNNNNN``."""
    return root / f"step-{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Main process only. Write ``root/step-NNNNNN`` atomically, then prune to ``keep_last``.

    ``optimizer_state`` is ``optimizer.state_dict()`` under data parallelism, or the full
    (gathered) optimizer state under FSDP (see the Trainer).
    """
    final = folder_of(root, step)

    def write_all(tmp: Path) -> None:
        write_model(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        faults.point("checkpoint_write", step)

    save_model_folder(final, write_all)
    for old in complete_checkpoints(root, check=False)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- reading


def step_of(folder: Path) -> int:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else -1


def verify(folder: Path, *, checksums: bool = True) -> str | None:
    """Return None if the folder matches its manifest, else the reason it does not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta['size']}"
        if checksums and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def complete_checkpoints(root: Path, *, check: bool = True) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first; with ``check``, only verified ones."""
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)
    if not check:
        return [p for p in found if (p / MANIFEST).is_file()]
    return [p for p in found if verify(p) is None]


def remove_partial(root: Path) -> None:
    """Main process only: delete ``.tmp-*`` folders an interrupted write left behind."""
    for tmp in root.glob(".tmp-*") if root.is_dir() else ():
        logger.warning("removing the partial checkpoint %s left by an interrupted write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: Path, *, checksums: bool = True) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are named in a warning.

    Read-only (partial ``.tmp-*`` folders are ignored here; :func:`remove_partial`
    deletes them), so every process can call it. ``checksums=False`` checks sizes only:
    the provisional answer of the processes other than the main one
    (:func:`agree_on_checkpoint`), which would otherwise each re-read every byte.
    """
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0),
                        key=step_of, reverse=True)
    for folder in candidates:
        problem = verify(folder, checksums=checksums)
        if problem is None:
            return folder
        if checksums:
            logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def agree_on_checkpoint(mine: Path | None, *, rank: int, broadcast: Any, root: Path
                        ) -> Path | None:
    """The main process's choice of checkpoint, on every process; the others check sizes.

    Each process picked ``mine`` alone before the process group existed; on NFS or a
    FUSE bucket two nodes can see different newest checkpoints, and resuming different
    steps hangs the job in mismatched collectives. Rank 0 (which verified checksums)
    decides; ``broadcast([obj])`` sends its list to all (Accelerate's
    ``broadcast_object_list``) by folder name, joined to each process's own ``root`` (the
    checkpoints folder): nodes may mount shared storage at different paths. A process
    that cannot see the chosen folder whole (sizes against the manifest) fails with one
    line naming it.
    """
    # By name: nodes may mount the shared output dir at different paths.
    chosen = broadcast([mine.name if mine is not None else None])[0]
    folder = None
    if chosen is not None:
        folder = (mine.parent if mine is not None else root) / chosen
    if rank != 0 and folder is not None and folder != mine:
        problem = verify(folder, checksums=False)
        if problem is not None:
            raise SetupError(f"process {rank} cannot resume from {folder}, the checkpoint the "
                             f"main process chose: {problem}; is the output dir shared by every "
                             "node and fully synced?")
        logger.warning("process %d resumes from %s, the main process's choice (it saw %s)",
                       rank, folder, mine)
    return folder


def check_same_engine(folder: Path, sharded: bool) -> None:
    """Refuse to resume ``folder`` under another engine than the one that wrote it.

    AdamW state in ``optimizer.pt`` is keyed by parameter position under data
    parallelism and by parameter name under FSDP (gathered full state), so each engine
    reads only its own. Checked before the model loads.
    """
    written = json.loads((folder / STATE).read_text()).get("sharded", False)
    if written != sharded:
        engines = {True: "FSDP", False: "data parallelism"}
        raise SetupError(f"{folder} was written under {engines[written]}; this run uses "
                         f"{engines[sharded]}: resume with the engine that wrote it (its "
                         "optimizer state is laid out for that engine)")


def load_training_state(folder: Path, scheduler: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the scheduler in place; return the trainer state and the optimizer's state.

    The caller loads the optimizer state: as it is under data parallelism, or sharded
    onto each process's parameters under FSDP. A sharded checkpoint's ``optimizer.pt``
    (the whole AdamW state: twice the fp32 model) is read by the main process alone;
    the others get ``{}`` and receive their shards from it (``broadcast_from_rank0``),
    so a node of 8 GPUs reads and holds it once, not 8 times.
    """
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    state = json.loads((folder / STATE).read_text())
    if state.get("sharded") and _rank() != 0:
        return state, {}
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return state, optimizer_state


def _rank() -> int:
    """This process's rank in the job's process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------- one run per dir




