"""Helpers for tests that run the pretraining script."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pretrain_overrides(output_dir: Path, corpus: Path, model_dir: Path, cache: Path,
                       **extra: object) -> list[str]:
    """A fast pretraining run of the tiny model (a few steps, seq 64, batch 4)."""
    args = {
        "output_dir": output_dir, "model.from_scratch": "null", "model.name_or_path": model_dir,
        "data.train_files": f"[{corpus}]", "data.cache_dir": cache, "data.max_seq_length": 64,
        "data.max_documents": 300, "train.max_steps": 6, "train.batch_size": 4,
        "train.warmup_steps": 2, "train.log_every_steps": 2, "checkpoint.every_steps": 3,
        "checkpoint.keep_last": 2, "model.attn_implementation": "eager",
        "objective.nsp": "true",  # the tiny model has both heads: test both objectives
        "data.eval_fraction": "null",  # the demo holds 5% out; tests/test_heldout.py sets it
    }
    args.update(extra)
    return ["recipe=demo", *(f"{k}={v}" for k, v in args.items())]


def run_script(args: list[str], *, env: dict[str, str] | None = None, launcher: list[str] | None
               = None, timeout: int = 300, script: str = "pretrain.py"
               ) -> subprocess.CompletedProcess:
    """Run further_pt/<script> as users do (a file, through `accelerate launch` if given)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [*(launcher or [sys.executable]), str(REPO / "further_pt" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


def resume_after_step_3(out: Path, args: list[str], tmp_path: Path) -> Path:
    """A copy of a finished 6-step run as if it died after its step-3 checkpoint, resumed with
    the same arguments; returns the resumed run's folder."""
    import shutil

    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000006")
    shutil.rmtree(crashed / "final")
    proc = run_script([a if not a.startswith("output_dir=") else f"output_dir={crashed}"
                       for a in args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step-000003" in proc.stderr
    return crashed


def run_scripts(*runs: tuple[list[str], dict[str, str] | None], script: str = "pretrain.py",
                timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent runs (args, env) at once: each is single-threaded (OMP_NUM_THREADS=1),
    so on 2 cores two of them take the wall time of one. Outputs must not overlap."""
    procs = [subprocess.Popen([sys.executable, str(REPO / "further_pt" / script), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
             for args, env in runs]
    done = []
    for args, proc in zip((r[0] for r in runs), procs, strict=True):
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return done


FRUIT = ["apple", "banana", "cherry", "grape", "melon", "peach", "plum"]
MOTOR = ["engine", "wheel", "brake", "motor", "clutch", "piston", "gear"]


def write_task(path: Path, n: int, seed: int, labels=("fruit", "motor")) -> Path:
    """A separable two-topic task: fruit words vs motor words, as JSON lines."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            label = labels[i % len(labels)]
            words = FRUIT if label in ("fruit", "sweet") else MOTOR
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=8)), "label": label}) + "\n")
    return path


def weights(folder: Path) -> dict:
    """A saved model folder's tensors (model.safetensors), by name."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """End a spawned gloo process's group: a barrier first, then the teardown.

    Without the barrier, one process can tear gloo down while its peer is still in the last
    collective, and it aborts at exit ("terminate called without an active exception") after
    writing correct results: 2 of 9 runs of the FSDP fp16 test here (torch 2.13 CPU), and a
    red CI. The trainer does the same (``export.finish`` waits for everyone before the group
    ends).
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


COLOR = ["red", "blue", "green", "yellow", "black", "white", "purple"]
TOPICS = {"fruit": FRUIT, "motor": MOTOR, "color": COLOR}


def write_multilabel_task(path: Path, n: int, seed: int) -> Path:
    """Rows with a set of topics (each of fruit, motor, color with probability 1/2; [] for none):
    eight words drawn from the topics held, or from ``other`` words for a row with none."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            held = [t for t in TOPICS if rng.random() < 0.5]
            words = [w for t in held for w in TOPICS[t]] or ["the", "of", "and", "to", "is"]
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=8)), "label": held}) + "\n")
    return path


def write_regression_task(path: Path, n: int, seed: int) -> Path:
    """Eight words, k of them fruit and the rest motor; the target is 5k / 8 (0 to 5)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            k = rng.randint(0, 8)
            words = rng.choices(FRUIT, k=k) + rng.choices(MOTOR, k=8 - k)
            rng.shuffle(words)
            fh.write(json.dumps({"text": " ".join(words), "label": 5 * k / 8}) + "\n")
    return path
