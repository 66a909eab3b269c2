"""Fault injection: kills, preemption, corrupt checkpoints, non-finite losses, a hung node.

Every fault is injected into a real run of the scripts (subprocesses, CPU, tiny
models). After each, re-running the same command must finish with final weights
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, pretrain_overrides, run_script, weights

STEPS = 8


def _args(out: Path, corpus: Path, model_dir: Path, cache: Path, **extra) -> list[str]:
    return pretrain_overrides(out, corpus, model_dir, cache, **{
        "train.max_steps": STEPS, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
        "train.gradient_accumulation_steps": 2, **extra})


def _same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file, tiny_model_dir) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("reference")
    cache = base / "cache"
    proc = run_script(_args(base / "run", corpus_file, tiny_model_dir, cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run" / "final", cache


@pytest.mark.slow
@pytest.mark.smoke
def test_kill_9_at_every_point_then_rerun_matches_uninterrupted(reference, tmp_path, corpus_file,
                                                                tiny_model_dir) -> None:
    """One run killed (SIGKILL) five times, once at each fault point, each rerun resuming the
    last; then its newest checkpoint is corrupted (one bit) and the last rerun falls back to
    the one before: the final weights equal the uninterrupted run's, bit for bit."""
    final, cache = reference
    args = _args(tmp_path / "run", corpus_file, tiny_model_dir, cache)
    ckpts = tmp_path / "run" / "checkpoints"
    chain = [  # fault, then what the killed run must have started from
        ("step:1", "mixed precision"),                 # before any checkpoint
        ("micro:3", "starting from step 0"),           # mid-accumulation (checkpoint 2 written)
        ("checkpoint_write:4", "step-000002 (step 2)"),  # half-way through writing checkpoint 4
        ("after_checkpoint:6", "step-000002 (step 2)"),  # the partial 4 is removed, 4 redone
        ("step:7", "step-000006 (step 6)"),            # after an optimizer step, no checkpoint
    ]
    for fault, started in chain:
        killed = run_script(args, env={"FURTHER_PT_FAULT": fault})
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-2000:])
        assert started in killed.stderr, (fault, killed.stderr[-2000:])
        if fault.startswith("checkpoint_write"):
            assert (ckpts / ".tmp-step-000004").is_dir()  # the half-written one is there...
        if fault.startswith("after_checkpoint"):
            assert "removing the partial checkpoint" in killed.stderr  # ...and is cleaned
    newest = ckpts / "step-000006"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / "model.safetensors").write_bytes(bytes(data))
    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping checkpoint {newest}: model.safetensors does not match its checksum" in (
        resumed.stderr)
    assert "step-000004 (step 4)" in resumed.stderr
    assert _same_weights(final, tmp_path / "run" / "final")
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "logs" / "metrics.jsonl")
              .read_text().splitlines()]
    assert logged == [2, 4, 6, 8]  # each step once: what a killed run logged past 4 was dropped


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes(reference, tmp_path, corpus_file,
                                                  tiny_model_dir) -> None:
    final, cache = reference
    out = tmp_path / "run"
    args = _args(out, corpus_file, tiny_model_dir, cache, **{"checkpoint.every_steps": 100,
                                                             "train.log_every_steps": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "further_pt" / "pretrain.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 75, stderr[-2000:]
    assert "stopped by a signal at step" in stderr and "run the same command to resume" in stderr
    stopped = int(stderr.split("stopped by a signal at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{stopped:06d}").is_dir()
    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(final, out / "final")


@pytest.mark.slow
def test_nonfinite_losses_stop_the_run_keeping_the_last_good_checkpoint(
        reference, tmp_path, corpus_file, tiny_model_dir) -> None:
    _, cache = reference
    out = tmp_path / "run"
    args = _args(out, corpus_file, tiny_model_dir, cache, **{"train.max_nonfinite_steps": 2})
    proc = run_script(args, env={"FURTHER_PT_FAULT": "nan:4"})
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == (
        "further_pt: training failed: 2 non-finite steps in a row at step 5; stopped. "
        f"The last good checkpoint is kept in {out / 'checkpoints'}")
    # Counted on the device, read where the loop reads it anyway (log steps, every 2 here):
    # step 4's skip is reported at step 4, the run of two found at step 6 and named as step 5.
    assert "1 update(s) skipped by step 4: non-finite loss or gradient (1 in all)" in proc.stderr
    # Step 4 was skipped (counted, weights untouched) and checkpointed; step 5 stopped the run.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002",
                                                                       "step-000004"]
    last = out / "checkpoints" / "step-000004"
    assert json.loads((last / "trainer_state.json").read_text())["nonfinite_steps"] == 1
    assert all(torch.isfinite(t).all() for t in weights(last).values())
    assert not (out / "final").exists()


@pytest.mark.slow
def test_unwritable_output_dir_fails_before_training(tmp_path, corpus_file, tiny_model_dir,
                                                     monkeypatch) -> None:
    from further_pt.config.recipes import ConfigError
    from further_pt.train import output_dir

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    proc = run_script(_args(blocker / "run", corpus_file, tiny_model_dir, tmp_path / "c"))
    assert proc.returncode == 2
    assert f"{blocker} is a file, not a folder" in proc.stderr.strip().splitlines()[-1]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10))
    with pytest.raises(ConfigError, match=r"0.00 GiB free, but checkpoints need about"):
        output_dir.check_writable(tmp_path / "new", 10**9)


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    from further_pt.train import checkpoint

    root = tmp_path / "checkpoints"
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def write_model(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"w" * 10)

    checkpoint.save_checkpoint(root, 1, write_model=write_model, optimizer_state=opt.state_dict(),
                               scheduler=sched,
                               state={}, keep_last=3)

    def full(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"No space left on device.*earlier checkpoints are intact"):
        checkpoint.save_checkpoint(root, 2, write_model=full, optimizer_state=opt.state_dict(),
                                   scheduler=sched,
                                   state={}, keep_last=3)
    assert [p.name for p in root.iterdir()] == ["step-000001"]
    assert checkpoint.latest_checkpoint(root) == root / "step-000001"


def _node(rank: int, port: int, args: list[str], log: Path, env: dict[str, str]
          ) -> subprocess.Popen:
    """One "machine" of a two-node job on this host: its own ``accelerate launch`` (torchrun
    agent + 1 process), in its own session so that it can be killed as a node dies."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "further_pt" / "pretrain.py"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **env}
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                cwd=REPO, start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant: a node's launcher, its torchrun agent and the
    workers, which torchrun starts in sessions of their own (killpg would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _run_nodes(tmp: Path, name: str, args: list[str], fault1: str | None = None,
               wait_for: int = 0) -> tuple[list[int | None], str, float]:
    """Start node 0 and node 1 (``fault1`` in node 1's FURTHER_PT_FAULT); wait for node
    ``wait_for``; kill what still runs (a hung node reclaimed). -> (exit codes, node 0's log,
    seconds until node ``wait_for`` exited)."""
    port, started = free_port(), time.time()
    nodes = [_node(r, port, args, tmp / f"{name}{r}.log",
                   {"FURTHER_PT_FAULT": fault1} if fault1 and r == 1 else {}) for r in (0, 1)]
    try:
        nodes[wait_for].wait(timeout=240)  # TimeoutExpired = a hang: the test fails
        waited = time.time() - started
        if fault1 is None:
            nodes[1 - wait_for].wait(timeout=240)
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_tree(n.pid)
                n.wait()
    return [n.returncode for n in nodes], (tmp / f"{name}0.log").read_text(), waited


@pytest.mark.slow
def test_two_nodes_survive_a_killed_and_a_hung_node(tmp_path, corpus_file, tiny_model_dir
                                                    ) -> None:
    """Two "machines" on one host (accelerate launch --num_machines 2 --machine_rank 0|1,
    gloo), checkpoints every 2 of 8 steps. Node 1 is killed after step 3: node 0 fails at once.
    Relaunched, both resume from step 2; node 1 then hangs after step 5 (SIGSTOP: alive,
    sockets open, as a frozen VM): node 0 fails after train.collective_timeout_s instead of
    waiting forever. Node 1 is reclaimed; relaunched, both resume from step 4 and finish."""
    out = tmp_path / "nodes"
    args = _args(out, corpus_file, tiny_model_dir, tmp_path / "cache",
                 **{"train.collective_timeout_s": 10})
    lost = "further_pt: training failed: lost contact with the other processes during step"

    codes, log0, _ = _run_nodes(tmp_path, "killed", args, "step:3:1")
    assert codes[0] != 0 and f"{lost} 4 (" in log0, log0[-3000:]  # torchrun exits 1
    line = next(x for x in log0.splitlines() if x.startswith(lost))
    assert "Timed out" not in line  # the dead peer's sockets closed: noticed without the timeout

    codes, log0, waited = _run_nodes(tmp_path, "hung", args, "step:5:1:stop")
    assert codes[0] != 0 and "step-000002 (step 2)" in log0
    # the gradient all-reduce's send or recv, whichever gloo was in when the peer froze
    line = next((x for x in log0.splitlines() if x.startswith(f"{lost} 6 (")), log0[-3000:])
    assert re.match(rf"{lost} 6 \(Timed out waiting 10000ms for (send|recv) operation to "
                    r"complete\): a process or node died, or hung past "
                    r"train\.collective_timeout_s=10;", line), line
    assert "[rank0]: Traceback" not in log0  # one line from us (the launcher adds its summary)
    assert waited > 10  # node 0 did wait for its frozen peer, as long as configured
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-000004"

    codes, log0, _ = _run_nodes(tmp_path, "resumed", args)
    assert codes == [0, 0], log0[-3000:]
    assert "step-000004 (step 4)" in log0 and "weights identical on all 2 processes" in log0
    assert "Final model" in log0  # the report, once per job: not from node 1's process
    assert "Final model" not in (tmp_path / "resumed1.log").read_text()
    steps = [json.loads(x)["step"] for x in (out / "logs" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps[-1] == STEPS and (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_finetune_killed_mid_epoch_resumes_to_the_same_model(tmp_path, tiny_model_dir) -> None:
    from helpers import run_scripts, write_task

    train, dev = write_task(tmp_path / "t.jsonl", 96, 0), write_task(tmp_path / "d.jsonl", 20, 1)

    def args(out: Path) -> list[str]:
        return ["recipe=fit", f"output_dir={out}", f"model.name_or_path={tiny_model_dir}",
                f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
                "data.head_tokens=8", "train.epochs=3", "train.batch_size=16", "train.lr=3e-3",
                "train.head_lr=3e-3", "model.attn_implementation=eager",
                f"data.cache_dir={out.parent / ('cache-' + out.name)}"]

    run = tmp_path / "killed"
    whole, killed = run_scripts((args(tmp_path / "whole"), None),  # side by side
                                (args(run), {"FURTHER_PT_FAULT": "step:9"}), script="finetune.py")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]  # epoch 1
    resumed = run_script(args(run), script="finetune.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert _same_weights(tmp_path / "whole" / "final", run / "final")
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert a["history"] == b["history"] and a["eval_accuracy"] == b["eval_accuracy"]


def test_a_broken_collective_becomes_one_line(tmp_path) -> None:
    from further_pt.errors import TrainingFailed
    from further_pt.train.launch import lost_peers

    closed = RuntimeError("[/x/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                          "[127.0.0.1]:41090. This is typically caused by a remote worker "
                          "crashing. GLHF!")
    failed = lost_peers(closed, world=2, step=3, timeout_s=20, ckpt_root=tmp_path)
    assert isinstance(failed, TrainingFailed) and failed.exit_code == 3
    assert str(failed) == (
        "lost contact with the other processes during step 4 (Connection closed by peer "
        "[127.0.0.1]:41090): a process or node died, or hung past "
        f"train.collective_timeout_s=20; checkpoints in {tmp_path} are kept: rerun the same "
        "command on every node to resume")
    assert lost_peers(closed, world=1, step=3, timeout_s=20, ckpt_root=tmp_path) is None
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert lost_peers(other, world=2, step=3, timeout_s=20, ckpt_root=tmp_path) is None
