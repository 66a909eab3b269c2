"""The reference for pretrain_throughput.py: MLM training as Hugging Face's example does it.

    python benchmarks/reference_mlm.py --train_file corpus.txt.gz --model_name_or_path DIR \\
        --output_dir OUT --max_train_steps 50 --per_device_train_batch_size 16 --threads 2

A condensed ``examples/pytorch/language-modeling/run_mlm_no_trainer.py`` (transformers),
kept step for step where it matters for speed, so that the comparison is with what a
user of the library would run:

- ``datasets.load_dataset("text")``, a batched ``map`` of
  ``tokenizer(text, return_special_tokens_mask=True)``, then ``group_texts`` (a second
  map) concatenating everything into ``max_seq_length`` blocks;
- ``DataCollatorForLanguageModeling(mlm_probability=0.15)`` (80/10/10) in a shuffled
  ``DataLoader``;
- ``AutoModelForMaskedLM`` with its full MLM head (vocabulary logits at every
  position), ``resize_token_embeddings``;
- AdamW over two groups (no decay on bias/LayerNorm), ``get_scheduler("linear")``;
- ``Accelerator()`` at its defaults (mixed precision from the environment, i.e.
  ``accelerate config``/``launch``; none in a plain ``python`` run) and
  ``accelerator.prepare`` of model, optimizer, loaders and scheduler;
- ``save_pretrained`` of model and tokenizer at the end.

Left out, because further_pt does not do them either during pretraining: the 5%
validation split and its perplexity pass, and trackers. Added: ``--threads``
(``torch.set_num_threads``), and ``bench.json`` in the output dir with the
steady-state timing (from the end of step ``--steady_after`` to the last step) and
the precision used.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from itertools import chain
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_file", required=True)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--lr_scheduler_type", default="linear")
    p.add_argument("--mlm_probability", type=float, default=0.15)
    p.add_argument("--preprocessing_num_workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--steady_after", type=int, default=10)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        get_scheduler,
        set_seed,
    )

    accelerator = Accelerator()
    if args.seed is not None:
        set_seed(args.seed)

    raw = load_dataset("text", data_files={"train": args.train_file})
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path, config=config)
    model.resize_token_embeddings(len(tokenizer))

    max_seq_length = min(args.max_seq_length, tokenizer.model_max_length)
    column_names = raw["train"].column_names
    text_column = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples[text_column], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated[next(iter(examples))])
        if total >= max_seq_length:
            total = (total // max_seq_length) * max_seq_length
        return {k: [t[i:i + max_seq_length] for i in range(0, total, max_seq_length)]
                for k, t in concatenated.items()}

    with accelerator.main_process_first():
        tokenized = raw.map(tokenize_function, batched=True,
                            num_proc=args.preprocessing_num_workers, remove_columns=column_names,
                            desc="Running tokenizer on every text in dataset")
        tokenized = tokenized.map(group_texts, batched=True,
                                  num_proc=args.preprocessing_num_workers,
                                  desc=f"Grouping texts in chunks of {max_seq_length}")
    train_dataset = tokenized["train"]

    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer,
                                                    mlm_probability=args.mlm_probability)
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator,
                                  batch_size=args.per_device_train_batch_size)

    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    steps_per_epoch = len(train_dataloader)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    num_epochs = math.ceil(args.max_train_steps / len(train_dataloader))

    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    completed, steady_start = 0, None
    scored = torch.zeros((), device=accelerator.device, dtype=torch.long)
    for _epoch in range(num_epochs):
        model.train()
        for batch in train_dataloader:
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            completed += 1
            if completed > args.steady_after:
                scored += (batch["labels"] != -100).sum()
            if completed == args.steady_after:
                sync()
                steady_start = time.perf_counter()
            if completed >= args.max_train_steps:
                break
        if completed >= args.max_train_steps:
            break
    sync()
    steady_s = time.perf_counter() - steady_start if steady_start is not None else None
    steady_steps = completed - args.steady_after

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        tokens = steady_steps * args.per_device_train_batch_size * max_seq_length
        Path(args.output_dir, "bench.json").write_text(json.dumps({
            "steps": completed, "steady_steps": steady_steps, "steady_s": steady_s,
            "steady_tokens": tokens, "masked_fraction": int(scored) / max(tokens, 1),
            "mixed_precision": str(accelerator.mixed_precision),
            "threads": torch.get_num_threads(), "device": str(accelerator.device),
            "blocks": len(train_dataset)}))


if __name__ == "__main__":
    main()
