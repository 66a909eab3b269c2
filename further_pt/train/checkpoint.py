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

Only data-parallel (DDP) runs are supported: optimizer state is replicated on
every rank, so the main process writes it and every rank reads it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from further_pt.config.recipes import flatten
from further_pt.errors import CheckpointWriteError, ConfigError, SetupError
from further_pt.train import faults

try:  # POSIX only; elsewhere OutputDirLock warns and does not lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INNER_LOCK = ".further_pt.lock"  # the lock inside an output dir whose parent is read-only
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------- output dir


def prepare_output_dir(
    output_dir: Path, config: dict[str, Any], *, overwrite: bool, may_differ: Iterable[str] = ()
) -> bool:
    """Check ``output_dir`` before any work; return True when an earlier run is to be resumed.

    An output dir that holds a run with the same config (keys in ``may_differ``
    aside) is resumed. One that holds a different run, or files that are not a
    run, is refused with a ConfigError, unless ``overwrite`` discards it. Does
    not write anything: call :func:`write_config` from the main process.
    """
    saved = output_dir / "config.yaml"
    check_output_dir_path(output_dir)
    if not output_dir.exists() or not any(p.name != INNER_LOCK for p in output_dir.iterdir()):
        return False
    if overwrite:
        return False
    if not saved.is_file():
        raise ConfigError(
            f"output_dir {output_dir} is not empty and holds no further_pt run (no config.yaml); "
            "choose another output_dir or set overwrite_output_dir=true"
        )
    old = flatten(yaml.safe_load(saved.read_text()) or {})
    new = flatten(config)
    # Keys the saved run does not have were added to further_pt after it started: it ran
    # without them, so they cannot differ from what it did (resuming after an upgrade).
    skip = set(may_differ) | (set(new) - set(old))
    changed = sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise ConfigError(
            f"output_dir {output_dir} holds a run with a different config ({k}: "
            f"{old.get(k)!r} there, {new.get(k)!r} now{more}); use another output_dir, or "
            "overwrite_output_dir=true to discard that run"
        )
    return True


def saved_has_key(output_dir: Path, key: str) -> bool:
    """Whether the run's saved config.yaml has ``key`` (dotted): false for a run started
    before further_pt had the key."""
    saved = output_dir / "config.yaml"
    if not saved.is_file():
        return True
    return key in flatten(yaml.safe_load(saved.read_text()) or {})


def check_output_dir_path(output_dir: Path) -> None:
    """The output dir is a folder (or can become one) in a writable place. Writes nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder")
    _existing_folder(output_dir)


def _existing_folder(output_dir: Path) -> Path:
    """The output dir or its nearest existing ancestor, which must be a writable folder."""
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output_dir {output_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir}: {probe} is not writable")
    return probe


def check_writable(output_dir: Path, needed_bytes: int) -> None:
    """Before training: the output dir can be written and its disk holds ``needed_bytes``."""
    free = shutil.disk_usage(_existing_folder(output_dir)).free
    if free < needed_bytes:
        raise ConfigError(
            f"output_dir {output_dir}: {free / 2**30:.2f} GiB free, but checkpoints need about "
            f"{needed_bytes / 2**30:.2f} GiB (two checkpoints of weights + optimizer state)")


def write_config(output_dir: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Main process only: (discard the old run if asked, then) write the resolved config.

    Discarding empties the folder rather than deleting it: it may be a mount point
    (``/runs`` in the image), and it may hold this run's own lock file.
    """
    if overwrite and output_dir.exists():
        for entry in output_dir.iterdir():
            if entry.name == INNER_LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


# --------------------------------------------------------------------------- writing


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    final = root / f"step-{step:06d}"

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
    onto each process's parameters under FSDP.
    """
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return json.loads((folder / STATE).read_text()), optimizer_state


# --------------------------------------------------------------------------- one run per dir


_HELD: set[str] = set()  # lock files this process holds (POSIX locks never exclude it)


def lock_path(output_dir: Path) -> Path:
    """Where the lock of ``output_dir`` lives: a hidden file beside it, or inside it.

    Beside it where its parent is writable, so a refused run leaves the output dir
    untouched. Inside it (``.further_pt.lock``, which the emptiness and overwrite checks
    ignore) where the parent is not: ``output_dir=/runs`` on a volume mounted at ``/runs``
    of a container whose user cannot write ``/``.
    """
    parent = output_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if os.access(parent, os.W_OK | os.X_OK) or not output_dir.is_dir():
        return output_dir.parent / f".{output_dir.name}.lock"
    return output_dir / INNER_LOCK


class OutputDirLock:
    """An exclusive, non-blocking POSIX lock on ``<parent>/.<name>.lock`` for the life of a run.

    Two runs writing one output dir would interleave checkpoints and each resume the
    other's. The lock file sits beside the output dir, not in it: a run refused for bad
    input leaves its output dir untouched, and ``overwrite_output_dir`` can delete the
    whole folder while the lock stays held. The file holds JSON ``{pid, host, started,
    argv}`` of the holder, which a refused run names in its SetupError; it is never
    deleted (deleting it would let a third run lock a new inode while a second still
    holds the old one).

    A POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to the process, so
    children forked while it is held (DataLoader workers, tokenizer pools) do not inherit
    it, and the OS drops it the moment the process dies, kill -9 included: a killed run
    can be re-run at once, with no stale lock. NFS supports these locks across nodes.
    Within one process, a second lock object on the same dir is refused here (POSIX
    locks do not exclude their own process). Without ``fcntl`` (Windows), or on a
    filesystem that refuses locks, it warns and runs unlocked.

    Acquire it on the main process only, before anything reads or writes ``output_dir``.
    """

    def __init__(self, output_dir: Path | str) -> None:
        self.output_dir = Path(output_dir)
        self.path = lock_path(self.output_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        """Take the lock (creating the output dir); SetupError naming the holder if it is taken."""
        if self._fd is not None:
            return self
        if fcntl is None:
            logger.warning("no fcntl on this platform: output_dir %s is not locked against a "
                           "second run", self.output_dir)
            return self
        if str(self.path) in _HELD:  # checked before opening: closing any descriptor of
            # the file would drop this process's POSIX lock on it
            raise SetupError(f"output_dir {self.output_dir} is in use by this process "
                             f"(pid {os.getpid()}; lock file {self.path})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise SetupError(f"output_dir {self.output_dir}: cannot create the lock file "
                             f"{self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _describe_holder(fd)
                os.close(fd)
                raise SetupError(
                    f"output_dir {self.output_dir} is in use by {holder} (lock file {self.path}); "
                    "wait for it or use another output_dir") from None
            os.close(fd)
            logger.warning("output_dir %s is not locked against a second run: a lock on %s "
                           "failed (%s)", self.output_dir, self.path, exc.strerror or exc)
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(str(self.path))
        return self

    def release(self) -> None:
        """Drop the lock (the file stays, see the class docstring). Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _HELD.discard(str(self.path))
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    """'pid P on host H since T' from the lock file, tolerating a holder still writing it."""
    for attempt in range(5):
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            return f"pid {info['pid']} on host {info['host']} since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            if attempt < 4:
                time.sleep(0.05)  # the holder locks first, then writes: give it a moment
    return "another process (its lock file holds no readable owner)"
