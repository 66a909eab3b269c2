"""Output dir: the read-only checks before a run, its config.yaml, and the lock that keeps
a second run out.

Everything here happens before the first step: a bad or unwritable output location, a
finished or different run already there, or a second job on the same folder is refused
in seconds, never after hours of training. :mod:`.checkpoint` handles what a run writes
once it is going.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from further_pt.config.recipes import flatten
from further_pt.errors import ConfigError, SetupError
from further_pt.files import atomic_write_text

try:  # POSIX only; elsewhere OutputDirLock warns and does not lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)
_HELD: set[str] = set()  # lock files this process holds (POSIX locks never exclude it)

INNER_LOCK = ".further_pt.lock"  # the lock inside an output dir whose parent is read-only


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
