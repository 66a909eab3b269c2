"""Doctor: does further_pt run right on this machine, and how fast? (``further-pt doctor``)

A user on a fresh GPU box, or inside the image, runs one command and learns within
minutes what works there: the versions against what further_pt declares; each GPU
with its bf16 / fp16 / TF32 support and memory; an NCCL all-reduce across the local
GPUs; a config-built BERT-base-size MLM pretraining in bf16 (tokens/s, MFU against the
device's dense peak); an fp16 run that survives a forced overflow; bf16 against fp32
loss parity; a run killed and resumed; what the measured throughput makes of a corpus
recipe's whole run (the papers' 100K steps of BERT-base at the recipe's global batch). Then
one summary line.

Every training check is a real run of ``further_pt/pretrain.py`` in a subprocess - the
code path users run, fault injection included (:mod:`further_pt.train.faults`) - on the
built-in corpus (the Python standard library's docstrings: nothing to download), with
a WordPiece tokenizer trained on it and a model built from a config. On a CPU the model
is the demo's size and the checks that need a GPU are listed as skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from further_pt.cli import projection as projected
from further_pt.data import builtin
from further_pt.train import gpu_driver, hardware

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "evaluate",
            "hydra-core", "omegaconf", "safetensors")
#: Model and run sizes: BERT-base on a GPU (as the papers), the demo's 2 x 128 on a CPU.
GPU_SIZE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "vocab_size": 30522, "batch": 32, "steps": 300}
CPU_SIZE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 512, "vocab_size": 8000, "batch": 16, "steps": 60}
SEQ = 128


@dataclass
class Check:
    """One line of the report: ``ok``, ``FAIL`` or ``skip``, what was found, how long it took."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    tokens_per_s: float | None = None  # the throughput check's measurement, for the projection

    def line(self) -> str:
        return f"[{self.status:>4s}] {self.name}: {self.detail} ({self.seconds:.0f} s)"


# ---------------------------------------------------------------- what is installed


def versions() -> Check:
    """Installed versions of the key packages, against further-pt's declared requirements."""
    from packaging.requirements import Requirement

    declared = {}
    try:
        for text in metadata.requires("further-pt") or []:
            req = Requirement(text)
            if req.marker is None:
                declared[req.name.lower()] = req.specifier
    except metadata.PackageNotFoundError:
        pass
    found, bad = [], []
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"{name} missing")
            continue
        found.append(f"{name} {version}")
        spec = declared.get(name)
        if spec is not None and not spec.contains(version, prereleases=True):
            bad.append(f"{name} {version} does not meet {spec}")
    cuda = torch.version.cuda
    detail = ", ".join(found) + f"; Python {sys.version.split()[0]}" + (
        f"; CUDA {cuda}" if cuda else "; CPU build")
    if bad:
        return Check("versions", "FAIL", "; ".join(bad) + f" ({detail})")
    return Check("versions", "ok", detail)


def devices() -> Check:
    """Each GPU's name, capability, memory and half-precision support, or the CPU's; a
    failure when the driver shows GPUs this torch cannot use (its line names the fix)."""
    if not torch.cuda.is_available():
        problem = gpu_driver.unusable_gpus()
        if problem is not None:
            return Check("devices", "FAIL", problem)
        flags = sorted(hardware.cpu_bf16_flags()) or ["no fast bf16"]
        return Check("devices", "ok", f"no CUDA GPU; CPU {cpu_model()}, "
                     f"{hardware.cpu_threads(1)} cores, {'/'.join(flags)}")
    parts = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        major, minor = props.major, props.minor
        support = [kind for kind, ok in (("bf16", major >= 8), ("fp16", major >= 7),
                                         ("TF32", major >= 8)) if ok] or ["fp32 only"]
        parts.append(f"cuda:{i} {props.name} (capability {major}.{minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, {'/'.join(support)})")
    return Check("devices", "ok", "; ".join(parts))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---------------------------------------------------------------- NCCL


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x = torch.full((64 * 2**20,), float(rank + 1), device="cuda")  # 256 MiB of fp32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    expected = world * (world + 1) / 2 * world**5  # 1 + 2 + ... then five more sums
    if rank == 0:
        ok = bool(torch.allclose(x[:8], torch.full((8,), expected, device="cuda")))
        bus = 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9
        Path(out).write_text(json.dumps({"ok": ok, "bus_gb_s": bus}))
    dist.destroy_process_group()


def all_reduce() -> Check:
    """An NCCL all-reduce across every local GPU: the right sum, and its bus bandwidth."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return Check("NCCL all-reduce", "skip", f"needs 2 or more GPUs ({n} here)")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_all_reduce_worker, args=(n, port, out), nprocs=n,
                           start_method="spawn")
        result = json.loads(Path(out).read_text())
    status = "ok" if result["ok"] else "FAIL"
    return Check("NCCL all-reduce", status, f"{n} GPUs, 256 MiB: "
                 f"{'correct sum' if result['ok'] else 'WRONG SUM'}, bus bandwidth "
                 f"{result['bus_gb_s']:.0f} GB/s")


# ---------------------------------------------------------------- training runs


class Runs:
    """Pretraining runs of one config-built model on the built-in corpus, in a scratch folder."""

    def __init__(self, work: Path, size: dict[str, int], on_gpu: bool) -> None:
        self.work, self.size, self.on_gpu = work, size, on_gpu
        self.model = work / "model"
        self.cache = work / "cache"

    def build_model(self) -> None:
        """A WordPiece tokenizer trained on the corpus and a randomly initialised BERT."""
        from transformers import BertConfig, BertForPreTraining

        from further_pt.data.tokenizer import train_wordpiece

        path = builtin.builtin_corpus("python-docstrings", self.cache)
        with open(path, encoding="utf-8") as fh:
            tokenizer = train_wordpiece(islice(fh, 20000), vocab_size=self.size["vocab_size"],
                                        lowercase=True, max_seq_length=512)
        s = self.size
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=s["hidden_size"],
                            num_hidden_layers=s["num_hidden_layers"],
                            num_attention_heads=s["num_attention_heads"],
                            intermediate_size=s["intermediate_size"],
                            pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        BertForPreTraining(config).save_pretrained(self.model)
        tokenizer.save_pretrained(self.model)

    def run(self, name: str, *, precision: str, steps: int, env: dict[str, str] | None = None,
            **extra: Any) -> tuple[subprocess.CompletedProcess, Path]:
        out = self.work / name
        args = {"output_dir": out, "model.name_or_path": self.model, "model.from_scratch": "null",
                "data.train_files": "[builtin:python-docstrings]",
                "data.cache_dir": self.cache, "data.max_documents": 20000,
                "data.max_seq_length": SEQ, "objective.nsp": "false",
                "train.batch_size": self.size["batch"], "train.max_steps": steps,
                "train.warmup_steps": max(1, steps // 10), "train.lr": 5e-4,
                "train.log_every_steps": max(1, steps // 10), "checkpoint.every_steps": steps,
                "train.mixed_precision": precision, **extra}
        script = Path(__file__).resolve().parents[1] / "pretrain.py"
        cmd = [sys.executable, str(script), "recipe=demo", *(f"{k}={v}" for k, v in args.items())]
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, check=False)
        return proc, out


def _log(out: Path) -> list[dict[str, Any]]:
    path = out / "logs" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _failed(name: str, proc: subprocess.CompletedProcess) -> Check:
    tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or ["no output"]
    return Check(name, "FAIL", f"exit {proc.returncode}: {tail[0][:300]}")


def throughput(runs: Runs, precision: str) -> Check:
    """Tokens/s and MFU of the steady state (the logging windows after the first)."""
    name = f"MLM pretraining, {precision}"
    proc, out = runs.run("throughput", precision=precision, steps=runs.size["steps"])
    if proc.returncode:
        return _failed(name, proc)
    windows = [x for x in _log(out) if "train/tokens_per_s" in x][1:]
    tokens = sum(x["train/tokens_per_s"] for x in windows) / max(len(windows), 1)
    mfu = [x["train/mfu"] for x in windows if "train/mfu" in x]
    s = runs.size
    return Check(name, "ok", f"{s['num_hidden_layers']} x {s['hidden_size']} BERT, batch "
                 f"{s['batch']} x {SEQ}, {s['steps']} steps: {tokens:,.0f} tokens/s"
                 + (f", MFU {100 * sum(mfu) / len(mfu):.1f}%" if mfu else ""),
                 tokens_per_s=tokens)


def projection(measured: Check, size: dict[str, int], gpus: int = 0) -> Check:
    """What the measured throughput makes of a corpus recipe's whole run (:mod:`.projection`)."""
    name = f"{projected.RECIPE} recipe's run, projected"
    if measured.status != "ok" or not measured.tokens_per_s:
        return Check(name, "skip", "no throughput measured")
    return Check(name, "ok", projected.wall_time(measured.tokens_per_s, size, GPU_SIZE,
                                                 seq=SEQ, gpus=gpus))


def fp16_overflow(runs: Runs) -> Check:
    """An fp16 run whose step 3 overflows: the GradScaler skips it and the run finishes."""
    name = "fp16 survives an overflow"
    if not runs.on_gpu:
        return Check(name, "skip", "fp16 loss scaling runs on CUDA GPUs only")
    proc, out = runs.run("fp16", precision="fp16", steps=20,
                         env={"FURTHER_PT_FAULT": "overflow:3"})
    if proc.returncode:
        return _failed(name, proc)
    skipped = json.loads((out / "metrics.json").read_text()).get("nonfinite_steps", 0)
    if skipped < 1:
        return Check(name, "FAIL", "the forced overflow at step 3 was not skipped")
    return Check(name, "ok", f"step 3 overflowed and was skipped ({skipped} skipped in all), "
                 "20 of 20 steps done")


def parity(runs: Runs, fast: str) -> Check:
    """The same seed in ``fast`` (bf16) and fp32: logged MLM losses within 0.1."""
    name = f"{fast} vs fp32 loss parity"
    steps = 40
    losses = {}
    for precision in (fast, "no"):
        proc, out = runs.run(f"parity-{precision}", precision=precision, steps=steps,
                             **{"train.tf32": "false"})
        if proc.returncode:
            return _failed(name, proc)
        losses[precision] = [x["train/mlm_loss"] for x in _log(out) if "train/mlm_loss" in x]
    worst = max(abs(a - b) for a, b in zip(losses[fast], losses["no"], strict=True))
    status = "ok" if worst < 0.1 else "FAIL"
    return Check(name, status, f"{steps} steps, largest difference of logged losses "
                 f"{worst:.3f} (limit 0.1); fp32 {losses['no'][0]:.2f} -> {losses['no'][-1]:.2f}")


def resume(runs: Runs, precision: str) -> Check:
    """A run killed (SIGKILL) after step 7, rerun: it resumes from its step-5 checkpoint."""
    name = "kill and resume"
    extra = {"checkpoint.every_steps": 5}
    killed, out = runs.run("resume", precision=precision, steps=12,
                           env={"FURTHER_PT_FAULT": "step:7"}, **extra)
    if killed.returncode == 0:
        return Check(name, "FAIL", "the fault did not stop the run")
    proc, out = runs.run("resume", precision=precision, steps=12, **extra)
    if proc.returncode:
        return _failed(name, proc)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    if "(step 5)" not in proc.stderr or steps != 12:
        return Check(name, "FAIL", f"did not resume from step 5 (ran to step {steps})")
    return Check(name, "ok", "killed after step 7, resumed from step 5, finished 12 steps")


# ---------------------------------------------------------------- the report


def _timed(fn: Callable[..., Check], *args: Any) -> Check:
    start = time.perf_counter()
    try:
        check = fn(*args)
    except Exception as exc:  # a check that crashes is a finding, not the doctor's end
        check = Check(fn.__name__, "FAIL", f"{type(exc).__name__}: {exc}"[:300])
    check.seconds = time.perf_counter() - start
    return check


def diagnose(work: Path | None = None, *, emit: Callable[[str], None] = print) -> list[Check]:
    """Run every check that applies here, printing each line as it finishes."""
    on_gpu = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(0) if on_gpu else None
    fast = "bf16" if (capability and capability[0] >= 8) or (
        not on_gpu and hardware.cpu_bf16_flags()) else ("fp16" if on_gpu else "no")
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        emit(check.line())

    for fn in (versions, devices, all_reduce):
        add(_timed(fn))
    with tempfile.TemporaryDirectory(prefix="further-pt-doctor-") as tmp:
        runs = Runs(Path(work or tmp), GPU_SIZE if on_gpu else CPU_SIZE, on_gpu)
        add(_timed(lambda: (runs.build_model(), Check(
            "model", "ok", f"tokenizer of {len(_vocab(runs.model))} pieces, "
            f"{runs.size['num_hidden_layers']} x {runs.size['hidden_size']} BERT"))[1]))
        add(_timed(throughput, runs, fast))
        add(_timed(projection, checks[-1], runs.size, torch.cuda.device_count() if on_gpu else 0))
        add(_timed(fp16_overflow, runs))
        if fast == "no":
            add(Check("bf16 vs fp32 loss parity", "skip", "no fast bf16 here"))
        else:
            add(_timed(parity, runs, fast))
        add(_timed(resume, runs, fast))
    return checks


def _vocab(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def summary(checks: list[Check]) -> str:
    """One line: OK or FAILED, where, the throughput, and what was skipped."""
    failed = [c.name for c in checks if c.status == "FAIL"]
    skipped = [c.name for c in checks if c.status == "skip"]
    speed = next((c.detail.split(": ", 1)[-1] for c in checks
                  if c.name.startswith("MLM pretraining") and c.status == "ok"), "no throughput")
    where = next(c.detail for c in checks if c.name == "devices")
    where = where.split(";")[0] if torch.cuda.is_available() else f"CPU {cpu_model()}"
    total = sum(c.seconds for c in checks)
    head = "OK" if not failed else f"FAILED ({', '.join(failed)})"
    return (f"further-pt doctor: {head} | {where} | torch {torch.__version__} | {speed} | "
            f"{len(checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
            f"{len(skipped)} skipped{': ' + ', '.join(skipped) if skipped else ''} | "
            f"{total:.0f} s")
