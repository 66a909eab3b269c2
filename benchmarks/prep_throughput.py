"""Corpus preparation throughput: text -> training instances, against the HF example's map.

    python benchmarks/prep_throughput.py [--mb 4]

Reference (``run_mlm.py``): ``tokenizer(text, return_special_tokens_mask=True)``
in a batched ``datasets.map``, then ``group_texts`` (a second map) into
128-token blocks. further_pt: ``build_instances`` (packed blocks; and NSP pairs,
a harder job the reference does not do), one map straight from the fast
tokenizer's backend. Each run is a fresh process with an empty datasets cache
(nothing reused), on 1 and on all cores; raw MB/s of text. Memory: peak RSS of
further_pt's packing at 1x and 10x the corpus (streaming keeps it flat).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SEQ = 128


def worker(args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_progress_bars()
    tok = common.tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("text", data_files=[str(args.corpus)], split="train",
                                   cache_dir=cache)
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        procs = args.procs if args.procs > 1 else None
        start = time.perf_counter()
        if args.path == "reference":
            def tokenize(batch: dict) -> dict:
                return tok(batch["text"], return_special_tokens_mask=True)

            def group_texts(batch: dict) -> dict:
                joined = {k: list(chain(*batch[k])) for k in batch}  # as run_mlm.py does
                total = (len(joined["input_ids"]) // SEQ) * SEQ
                return {k: [v[i:i + SEQ] for i in range(0, total, SEQ)] for k, v in joined.items()}

            out = ds.map(tokenize, batched=True, num_proc=procs, remove_columns=["text"])
            out = out.map(group_texts, batched=True, num_proc=procs)
        else:
            from further_pt.data.instances import build_instances

            out = build_instances(ds, tok, nsp=args.path == "further_pt_nsp", max_seq_length=SEQ,
                                  short_seq_prob=0.1, txt_documents="line", seed=0,
                                  num_proc=args.procs)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "instances": len(out),
                      "peak_rss_mb": common.peak_rss_mb()}))


def write_corpus(path: Path, megabytes: float) -> int:
    text = common.texts(2_000_000)
    size, lines = 0, []
    while size < megabytes * 2**20:
        for line in text:
            lines.append(line)
            size += len(line.encode()) + 1
            if size >= megabytes * 2**20:
                break
    path.write_text("\n".join(lines) + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["reference", "further_pt", "further_pt_nsp"])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = Path(tempfile.mkdtemp(prefix="further_pt_prep_"))
    small, large = work / "small.txt", work / "large.txt"
    size_small = write_corpus(small, args.mb)
    size_large = write_corpus(large, args.mb * 10)
    cores = os.cpu_count() or 1
    results: dict = {"corpus_mb": size_small / 2**20, "throughput": {}}
    for procs in sorted({1, cores}):
        runs: dict[str, list[float]] = {"reference": [], "further_pt": [], "further_pt_nsp": []}
        for _ in range(args.repeats):
            for path in runs:
                r = common.run_worker(Path(__file__), ["--path", path, "--corpus", str(small),
                                                       "--procs", str(procs)])
                runs[path].append(size_small / 2**20 / r["seconds"])
        mbs = {k: statistics.median(v) for k, v in runs.items()}
        results["throughput"][f"{procs}_proc"] = {
            **{f"{k}_mb_per_s": v for k, v in mbs.items()},
            "speedup": mbs["further_pt"] / mbs["reference"]}
        print(f"{procs} process(es): reference {mbs['reference']:.2f} MB/s | further_pt packed "
              f"{mbs['further_pt']:.2f} MB/s | further_pt NSP {mbs['further_pt_nsp']:.2f} MB/s | "
              f"speedup {mbs['further_pt'] / mbs['reference']:.2f}x")
    rss = {name: common.run_worker(Path(__file__), ["--path", "further_pt", "--corpus",
                                                    str(corpus)])["peak_rss_mb"]
           for name, corpus in (("1x", small), ("10x", large))}
    growth = rss["10x"] / rss["1x"]
    results["rss_mb"] = {**rss, "growth_10x_corpus": growth, "large_corpus_mb": size_large / 2**20}
    print(f"peak RSS, further_pt packing: {rss['1x']:.0f} MB at {size_small / 2**20:.0f} MB of "
          f"text, {rss['10x']:.0f} MB at {size_large / 2**20:.0f} MB ({growth:.2f}x)")
    out = common.write_results("prep_throughput", results)
    best = max(results["throughput"].values(), key=lambda r: r["speedup"])
    one = results["throughput"]["1_proc"]
    print(f"(figures in {out})")
    print(f"prep_throughput: speedup {one['speedup']:.2f}x MB/s on 1 process, "
          f"{best['speedup']:.2f}x best; RSS growth {growth:.2f}x for a 10x corpus")


if __name__ == "__main__":
    main()
