"""One run per output dir: OutputDirLock refuses a second holder and never goes stale."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from further_pt.errors import SetupError
from further_pt.train import output_dir
from further_pt.train.output_dir import OutputDirLock, lock_path, prepare_output_dir, write_config

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time\n"
          "from further_pt.train.output_dir import OutputDirLock\n"
          "lock = OutputDirLock(sys.argv[1]).acquire()\n"
          "print('ready', flush=True)\n"
          "time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path: Path):
    """A separate process that holds the lock on ``tmp_path / 'run'`` until killed."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_second_acquirer_is_refused_naming_the_holder(holder) -> None:
    out, proc = holder
    info = json.loads(lock_path(out).read_text())
    assert info["pid"] == proc.pid
    assert info["host"] == socket.gethostname()
    assert info["argv"][-1] == str(out)
    with pytest.raises(SetupError) as caught:
        OutputDirLock(out).acquire()
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"output_dir {out} is in use by pid {proc.pid} on host "
                       f"{socket.gethostname()} since {info['started']} (lock file "
                       f"{lock_path(out)}); wait for it or use another output_dir")
    # the refused attempt did not overwrite the holder's record
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid


def test_kill_9_leaves_no_stale_lock(holder) -> None:
    out, proc = holder
    with pytest.raises(SetupError, match=f"pid {proc.pid}"):
        OutputDirLock(out).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    with OutputDirLock(out) as lock:
        assert lock.held
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_release_then_reacquire_and_same_process_exclusion(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"  # created by acquire
    first = OutputDirLock(out).acquire()
    assert first.held and lock_path(out).is_file()
    with pytest.raises(SetupError, match=f"in use by this process \\(pid {os.getpid()};"):
        OutputDirLock(out).acquire()  # refused within one process too
    first.release()
    first.release()  # idempotent
    assert not first.held
    second = OutputDirLock(out).acquire()
    assert second.held
    second.release()
    assert lock_path(out).is_file()  # the file stays; only the lock goes


def test_lock_file_is_beside_the_output_dir_and_survives_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = {"seed": 1}
    with OutputDirLock(out):
        assert not out.exists()  # locking writes nothing into the output dir
        assert prepare_output_dir(out, config, overwrite=False) is False
        write_config(out, config, overwrite=False)
        (out / "checkpoints" / "step-000001").mkdir(parents=True)
        (out / "stray.txt").write_text("x")
        write_config(out, {"seed": 2}, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
        assert lock_path(out) == tmp_path / ".run.lock"
        with pytest.raises(SetupError):  # the same inode is still locked
            OutputDirLock(out).acquire()


def test_without_fcntl_it_warns_and_does_not_lock(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(output_dir, "fcntl", None)
    with caplog.at_level("WARNING", logger="further_pt.train.output_dir"):
        a = OutputDirLock(tmp_path).acquire()
        b = OutputDirLock(tmp_path).acquire()
    assert not a.held and not b.held
    assert "not locked" in caplog.text
    a.release()


def test_a_child_forked_by_the_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    """DataLoader workers outlive a SIGKILLed run for a moment: they must not hold its lock."""
    out = tmp_path / "run"
    code = ("import os, sys, time\n"
            "from further_pt.train.output_dir import OutputDirLock\n"
            f"OutputDirLock({str(out)!r}).acquire()\n"
            "child = os.fork()\n"
            "if child == 0:\n    time.sleep(30)\n    os._exit(0)\n"
            "print(child, flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(SetupError, match=f"pid {holder.pid} on host"):
            OutputDirLock(out).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child still runs...
        with OutputDirLock(out) as lock:  # ...and the lock is free at once
            assert lock.held
    finally:
        os.kill(child, signal.SIGKILL)


def test_output_dir_on_a_read_only_parent_holds_its_own_lock(tmp_path: Path,
                                                             monkeypatch) -> None:
    """output_dir=/runs in a container: the volume is writable, / is not. The lock goes inside
    the folder; an empty folder with only its lock is a fresh run; overwrite keeps the lock
    (and the folder itself: it may be a mount point)."""
    out = tmp_path / "runs"
    out.mkdir()
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert lock_path(out) == out / ".further_pt.lock"
    with OutputDirLock(out):
        assert prepare_output_dir(out, {"seed": 1}, overwrite=False) is False
        write_config(out, {"seed": 1}, overwrite=False)
        (out / "checkpoints").mkdir()
        assert prepare_output_dir(out, {"seed": 1}, overwrite=False) is True
        write_config(out, {"seed": 2}, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == [".further_pt.lock", "config.yaml"]
        with pytest.raises(SetupError):  # still held
            OutputDirLock(out).acquire()
