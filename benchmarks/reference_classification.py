"""The reference for finetune_throughput.py: classification fine-tuning as Hugging Face's example.

    python benchmarks/reference_classification.py --train_file train.jsonl \\
        --validation_file dev.jsonl --model_name_or_path DIR --output_dir OUT \\
        --per_device_train_batch_size 24 --learning_rate 2e-5 --num_train_epochs 2 --threads 2

A condensed ``examples/pytorch/text-classification/run_glue_no_trainer.py``
(transformers) for a JSON dataset with ``text`` and ``label`` fields, kept step for
step where it matters for speed:

- ``datasets.load_dataset("json")``; labels are the sorted unique training labels;
- a batched ``map`` of ``tokenizer(text, max_length=128, truncation=True)`` (no
  padding: ``--pad_to_max_length`` is off by default), i.e. head truncation;
- ``DataCollatorWithPadding`` (dynamic padding to the longest in the batch;
  ``pad_to_multiple_of=8`` under fp16/bf16, as the example does), shuffled loader;
- ``AutoModelForSequenceClassification``, AdamW over two groups (no decay on
  bias/LayerNorm), ``get_scheduler("linear")``, ``Accelerator()`` at its defaults;
- evaluation on the validation file after every epoch (accuracy; the example uses
  ``evaluate.load("accuracy")``, which needs the Hub, so it is counted here), and
  ``save_pretrained`` of model and tokenizer at the end with ``all_results.json``.

Added: ``--threads`` (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--pad_to_max_length", action="store_true")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--lr_scheduler_type", default="linear")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
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
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_scheduler,
        set_seed,
    )

    accelerator = Accelerator()
    if args.seed is not None:
        set_seed(args.seed)
    raw = load_dataset("json", data_files={"train": args.train_file,
                                           "validation": args.validation_file})
    label_list = sorted(raw["train"].unique("label"))
    config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=len(label_list))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path,
                                                               config=config)
    label_to_id = {v: i for i, v in enumerate(label_list)}
    model.config.label2id = label_to_id
    model.config.id2label = {i: label for label, i in label_to_id.items()}
    padding = "max_length" if args.pad_to_max_length else False

    def preprocess_function(examples: dict) -> dict:
        result = tokenizer(examples["text"], padding=padding, max_length=args.max_length,
                           truncation=True)
        result["labels"] = [label_to_id[x] for x in examples["label"]]
        return result

    with accelerator.main_process_first():
        processed = raw.map(preprocess_function, batched=True,
                            remove_columns=raw["train"].column_names,
                            desc="Running tokenizer on dataset")
    train_dataset, eval_dataset = processed["train"], processed["validation"]

    if args.pad_to_max_length:
        from transformers import default_data_collator as data_collator
    else:
        multiple = 8 if accelerator.mixed_precision in ("fp16", "bf16") else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=data_collator,
                                 batch_size=args.per_device_eval_batch_size)

    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    max_train_steps = args.num_train_epochs * math.ceil(len(train_dataloader))
    lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps,
                                 num_training_steps=max_train_steps)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)

    history = []
    for epoch in range(args.num_train_epochs):
        model.train()
        for batch in train_dataloader:
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        model.eval()
        correct = total = 0
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics(
                (predictions, batch["labels"]))
            correct += int((predictions == references).sum())
            total += int(references.numel())
        history.append({"epoch": epoch + 1, "eval_accuracy": correct / max(total, 1)})
        accelerator.print(f"epoch {epoch}: accuracy {correct / max(total, 1):.4f}")

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        Path(args.output_dir, "all_results.json").write_text(json.dumps({
            "eval_accuracy": history[-1]["eval_accuracy"], "history": history,
            "train_examples": len(train_dataset), "steps": max_train_steps,
            "mixed_precision": str(accelerator.mixed_precision),
            "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
