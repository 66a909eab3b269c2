"""Pretraining throughput: further_pt's trainer step against the Hugging Face example's.

    python benchmarks/pretrain_throughput.py [--steps 8] [--repeats 3]

Both paths train the same model config on the same packed 128-token blocks with
the same batch size, optimizer and number of steps, each in its own process
(so each has its own peak RSS), interleaved A B A B ... and summarised by the
median:

- reference: ``run_mlm_no_trainer.py``'s path: ``DataCollatorForLanguageModeling``
  (15% masking, 80/10/10), ``BertForMaskedLM(**batch)`` with labels, i.e. the MLM
  head's full-vocabulary logits at every position;
- further_pt: the masking stage (exact 15%, max 20 per sequence) and the
  ``PretrainingObjective`` with the sparse MLM head (logits only where masked).

MFU = model FLOPs per step / step time / the peak fp32 matmul FLOP/s measured
here in the same run. Model FLOPs per step (training = 3 x forward):
``6 * N * T`` for the encoder (N = non-embedding encoder parameters, T tokens)
+ ``12 * L * S * H * T`` for attention scores and mixing (L layers, S sequence
length, H hidden) + ``6 * (H*H + H*V) * P`` for the MLM head on the P positions
it actually scores (all T for the reference; the masked ones for further_pt).
On a GPU the same script measures the bf16/SDPA path when run there; the CPU
figures are the ones in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SIZES = {  # name: (layers, hidden, heads, intermediate)
    "minilm-6x384": (6, 384, 12, 1536),
    "tiny-2x128": (2, 128, 2, 512),
}
SEQ = 128


def build_blocks(path: Path, n_blocks: int) -> None:
    tok = common.tokenizer()
    ids = [e.ids for e in tok.backend_tokenizer.encode_batch(
        common.texts(20_000), add_special_tokens=False)]
    stream = [t for doc in ids for t in (*doc, tok.sep_token_id)]
    body = SEQ - 2
    blocks = [[tok.cls_token_id, *stream[i:i + body], tok.sep_token_id]
              for i in range(0, body * n_blocks, body)]
    torch.save({"blocks": torch.tensor(blocks), "vocab": len(tok),
                "special": torch.tensor(sorted(set(tok.all_special_ids))),
                "mask_id": tok.mask_token_id}, path)


def worker(args: argparse.Namespace) -> None:
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    from further_pt.masking import mask_tokens
    from further_pt.objective import PretrainingObjective

    torch.set_num_threads(args.threads)
    data = torch.load(args.blocks, weights_only=True)
    blocks, vocab = data["blocks"], data["vocab"]
    layers, hidden, heads, inter = SIZES[args.size]
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=hidden,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=inter, max_position_embeddings=512,
                                       attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    if args.path == "reference":
        tok = common.tokenizer()
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)

        def step(rows: torch.Tensor) -> int:
            batch = collator([{"input_ids": r.tolist()} for r in rows])
            model(**batch).loss.backward()
            return int((batch["labels"] != -100).sum())
    else:
        objective = PretrainingObjective(model, nsp=False)
        special, mask_id = data["special"], int(data["mask_id"])

        def step(rows: torch.Tensor) -> int:
            attn = torch.ones_like(rows)
            masked, labels = mask_tokens(rows, attn, special_ids=special, mask_token_id=mask_id,
                                         vocab_size=vocab, masked_lm_prob=0.15,
                                         max_predictions=20, generator=gen)
            objective(masked, attn, torch.zeros_like(rows), labels).total.backward()
            return int((labels != -100).sum())

    model.train()
    times, predicted = [], 0
    for i in range(args.warmup + args.steps):
        rows = blocks[(i * args.batch) % (len(blocks) - args.batch):][:args.batch]
        start = time.perf_counter()
        scored = step(rows)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            predicted += scored
    non_embedding = sum(p.numel() for n, p in model.bert.encoder.named_parameters())
    print(json.dumps({"seconds_per_step": statistics.median(times),
                      "predicted_per_step": predicted / args.steps,
                      "encoder_params": non_embedding, "peak_rss_mb": common.peak_rss_mb()}))


def model_flops(size: str, batch: int, vocab: int, encoder_params: int, scored: float) -> float:
    layers, hidden, _, _ = SIZES[size]
    tokens = batch * SEQ
    return (6 * encoder_params * tokens + 12 * layers * SEQ * hidden * tokens
            + 6 * (hidden * hidden + hidden * vocab) * scored)


def main() -> None:
    parser = common.training_parser(__doc__, batch=8, steps=8)
    parser.add_argument("--size", choices=list(SIZES), default="minilm-6x384")
    parser.add_argument("--blocks", type=Path, default=Path("/tmp/further_pt_bench/blocks.pt"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.blocks.parent.mkdir(parents=True, exist_ok=True)
    if not args.blocks.exists():
        build_blocks(args.blocks, 2000)
    vocab = torch.load(args.blocks, weights_only=True)["vocab"]
    peak = common.peak_matmul_flops(args.threads)
    results: dict[str, dict] = {}
    for size in SIZES:
        runs: dict[str, list[dict]] = {"reference": [], "further_pt": []}
        for _ in range(args.repeats):
            for path in runs:  # interleaved: A B A B ...
                runs[path].append(common.run_worker(Path(__file__), [
                    "--path", path, "--size", size, "--blocks", str(args.blocks),
                    *common.worker_args(args)]))
        summary = {}
        for path, rs in runs.items():
            sec = statistics.median(r["seconds_per_step"] for r in rs)
            scored = (args.batch * SEQ if path == "reference"  # the dense head scores all
                      else statistics.median(r["predicted_per_step"] for r in rs))
            flops = model_flops(size, args.batch, vocab, rs[0]["encoder_params"], scored)
            summary[path] = {"tokens_per_s": args.batch * SEQ / sec, "seconds_per_step": sec,
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                             "model_flops_per_step": flops, "mfu": flops / sec / peak}
        summary["speedup"] = summary["further_pt"]["tokens_per_s"] / summary["reference"][
            "tokens_per_s"]
        results[size] = summary
        ref, ours = summary["reference"], summary["further_pt"]
        print(f"{size}: reference {ref['tokens_per_s']:.0f} tok/s (MFU {ref['mfu']:.1%}, "
              f"RSS {ref['peak_rss_mb']:.0f} MB) | further_pt {ours['tokens_per_s']:.0f} tok/s "
              f"(MFU {ours['mfu']:.1%}, RSS {ours['peak_rss_mb']:.0f} MB) | "
              f"speedup {summary['speedup']:.2f}x")
    out = common.write_results("pretrain_throughput", {
        "peak_matmul_flops": peak, "batch": args.batch, "seq": SEQ, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "results": results})
    main_size = results["minilm-6x384"]
    print(f"(peak fp32 matmul {peak / 1e9:.1f} GFLOP/s; figures in {out})")
    print(f"pretrain_throughput: speedup {main_size['speedup']:.2f}x tokens/s (minilm-6x384), "
          f"{results['tiny-2x128']['speedup']:.2f}x (tiny-2x128); MFU "
          f"{main_size['further_pt']['mfu']:.1%} vs {main_size['reference']['mfu']:.1%}")


if __name__ == "__main__":
    main()
