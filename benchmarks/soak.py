"""Soak: the paper's run length, held. The demo model for 20K steps with kill -9s on the way.

    python benchmarks/soak.py                        # 20,000 steps, kill -9 at 7,000 and 14,000
    python benchmarks/soak.py --steps 2000 --kills 700,1400 --every 200   # a shorter soak

The recipes default to 100K steps; this runs the demo model (``recipe=demo``, a tiny BERT
from scratch on the embedded corpus) ``--steps`` steps as one job that is killed with SIGKILL
(no clean-up, as an OOM-killer or a lost node does) once each ``--kills`` step has been
passed, and rerun with the same command each time (it resumes from its last checkpoint).
Every ``--every`` steps (one log line, one checkpoint, ``checkpoint.keep_last=2``) it samples
the training process's RSS, the disk use of ``output_dir``, the newest checkpoint's size and
the step time of that window (``train/steps_per_s`` of metrics.jsonl). It prints the slopes
(least squares: MB and ms per 10K steps; a leak or an unrotated checkpoint shows as a
slope) and compares the killed-and-resumed run's final weights with an uninterrupted run of
the same steps (``--no-reference`` skips that second run). The bar: flat RSS and disk, a
constant step time, bit-equal weights. Results: benchmarks/results/soak.json (a run with
other --steps/--kills/--every writes its JSON under --work instead).

Both runs share one ``data.cache_dir``, so the reference starts from the vocabulary the
soak's first process trained (WordPiece training is not deterministic; see
``further_pt.data.prepare.scratch_tokenizer``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _du_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _log_lines(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    if not path.is_file():
        return [], seen
    lines = path.read_text().splitlines()
    out = []
    for line in lines[seen:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            return out, seen + len(out)  # a line being written: read it next time
    return out, len(lines)


def slope_per_10k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, value), per 10,000 steps."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 10_000 if sxx else float("nan")


def command(out: Path, cache: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, str(ROOT / "further_pt" / "pretrain.py"), "recipe=demo",
            f"output_dir={out}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
            f"train.log_every_steps={every}", f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=2", f"eval.every_steps={every}"]


def soak(out: Path, cache: Path, steps: int, every: int, kills: list[int]) -> dict[str, Any]:
    """Run to ``steps``, SIGKILLed past each of ``kills``; the samples and the restarts."""
    samples: list[dict[str, Any]] = []
    log = out / "logs" / "metrics.jsonl"
    seen, pending, restarts = 0, sorted(kills), 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    while True:
        with open(out.parent / "soak.err", "a") as err:
            proc = subprocess.Popen(command(out, cache, steps, every), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        killed = False
        while proc.poll() is None:
            time.sleep(0.5)
            rss = _rss_mb(proc.pid)
            lines, seen = _log_lines(log, seen)
            for line in lines:
                step = line.get("step")
                if "train/steps_per_s" not in line or step is None:
                    continue
                ckpts = sorted((out / "checkpoints").glob("step-*"))
                samples.append({
                    "step": step, "rss_mb": rss, "disk_mb": _du_mb(out),
                    "checkpoint_mb": _du_mb(ckpts[-1]) if ckpts else None,
                    "step_ms": 1000 / line["train/steps_per_s"], "run": restarts})
                print(f"step {step:>6}: RSS {rss or 0:7.1f} MB, output_dir "
                      f"{samples[-1]['disk_mb']:7.1f} MB, step {samples[-1]['step_ms']:6.1f} ms",
                      flush=True)
                if pending and step >= pending[0]:
                    pending.pop(0)
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    print(f"kill -9 at step {step}", flush=True)
                    break
        proc.wait()
        if not killed:
            if proc.returncode != 0:
                raise SystemExit(f"the soak run failed (exit {proc.returncode}); see "
                                 f"{out.parent / 'soak.err'}")
            return {"samples": samples, "restarts": restarts}
        restarts += 1


def same_weights(a: Path, b: Path) -> tuple[bool, float]:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--kills", default="7000,14000", help="steps to kill -9 after")
    parser.add_argument("--every", type=int, default=1000, help="sample/checkpoint interval")
    parser.add_argument("--work", type=Path, default=Path("/tmp/further_pt_soak"))
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the uninterrupted run (no weight comparison)")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    kills = [int(k) for k in args.kills.split(",") if k]
    start = time.time()
    result = soak(args.work / "soak", args.work / "cache", args.steps, args.every, kills)
    soak_s = time.time() - start
    # The first window of each process holds its start-up (compile, data, workers): the
    # slopes use the steady windows.
    steady = [s for i, s in enumerate(result["samples"])
              if i and s["run"] == result["samples"][i - 1]["run"]]
    slopes = {
        "rss_mb_per_10k_steps": slope_per_10k([(s["step"], s["rss_mb"]) for s in steady
                                               if s["rss_mb"]]),
        "disk_mb_per_10k_steps": slope_per_10k([(s["step"], s["disk_mb"]) for s in steady]),
        "checkpoint_mb_per_10k_steps": slope_per_10k(
            [(s["step"], s["checkpoint_mb"]) for s in steady if s["checkpoint_mb"]]),
        "step_ms_per_10k_steps": slope_per_10k([(s["step"], s["step_ms"]) for s in steady]),
    }
    report: dict[str, Any] = {"machine": machine(), "steps": args.steps, "kills": kills,
                              "every": args.every, "restarts": result["restarts"],
                              "soak_wall_s": round(soak_s, 1), "slopes": slopes,
                              "samples": result["samples"]}
    if steady:
        report["mean_step_ms"] = sum(s["step_ms"] for s in steady) / len(steady)
    if not args.no_reference:
        ref = args.work / "reference"
        proc = subprocess.run(command(ref, args.work / "cache", args.steps, args.every),
                              env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   "HF_DATASETS_OFFLINE": "1",
                                   "TOKENIZERS_PARALLELISM": "false"},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        equal, worst = same_weights(args.work / "soak" / "final", ref / "final")
        report["final_weights_bit_equal"] = equal
        report["final_weights_max_abs_diff"] = worst
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    # Only the full soak is a result; a shorter one (a check of the script) stays in --work.
    full = (args.steps, kills, args.every) == (20_000, [7000, 14000], 1000)
    dest = RESULTS / "soak.json" if full else args.work / "soak.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {dest}")


if __name__ == "__main__":
    main()
