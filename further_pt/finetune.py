"""Fine-tuning for text classification, with the strategies of Sun et al. 2019 and ULMFiT.

    accelerate launch further_pt/finetune.py recipe=fit model.name_or_path=runs/in_domain/final \\
        data.train_file=train.jsonl data.eval_file=dev.jsonl

Recipes: ``fit`` (Sun et al.'s BERT-FiT), ``ulmfit`` (STLR, discriminative rates,
gradual unfreezing, concat pooling), ``feat`` (BERT-Feat: frozen encoder),
``multitask``. Same Accelerate setup, checkpoint core and recipe system as
pretraining; re-running the same command resumes.

Top to bottom: config -> output dir -> model config and tokenizer -> labelled
data -> classifier and layer groups -> optimizer and schedule -> (resume) ->
the loop (evaluating each epoch, keeping the best model) -> metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, "") and sys.path and Path(sys.path[0]).name == "further_pt":
    sys.path.pop(0)

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from further_pt import (
    checkpoint,
    classification_data,
    config,
    evaluation,
    faults,
    instances,
    layerwise,
    model,
    schedules,
    training,
)
from further_pt.config import ConfigError
from further_pt.heads import Classifier, HeadSpec, load_classifier

logger = logging.getLogger("further_pt.finetune")

RESUMABLE_KEYS = ("output_dir", "overwrite_output_dir", "train.log_every_steps",
                  "checkpoint.keep_last", "data.dataloader_workers", "data.cache_dir",
                  "eval.batch_size")


@dataclass
class Task:
    name: str
    labels: list[str]
    train: Any  # tokenized datasets.Dataset
    eval: Any | None
    eval_file: str | None


def load_tasks(cfg: DictConfig, tokenizer: Any) -> list[Task]:
    """Read, label and tokenize every task (one unless ``tasks`` lists several)."""
    d = cfg.data
    specs = cfg.tasks or [{"name": "main", "train_file": d.train_file, "eval_file": d.eval_file,
                           "text_column": d.text_column, "label_column": d.label_column}]
    cache = str(Path(d.cache_dir).expanduser() / "datasets") if d.cache_dir else None
    tasks = []
    for spec in specs:
        columns = [spec["text_column"], spec["label_column"]]
        if d.text_pair_column:
            columns.insert(1, d.text_pair_column)
        train = classification_data.read_labelled(spec["train_file"], columns=columns,
                                                  cache_dir=cache)
        names = classification_data.label_names(train, spec["label_column"], spec["train_file"])
        encode = partial(classification_data.tokenize, tokenizer=tokenizer,
                         text_column=spec["text_column"], text_pair_column=d.text_pair_column,
                         strategy=d.truncation, max_seq_length=d.max_seq_length,
                         head_tokens=d.head_tokens, max_segments=d.max_segments)
        labels = classification_data.encode_labels(train, spec["label_column"], names,
                                                   spec["train_file"])
        evaluated = None
        if spec["eval_file"]:
            raw = classification_data.read_labelled(spec["eval_file"], columns=columns,
                                                    cache_dir=cache)
            eval_labels = classification_data.encode_labels(raw, spec["label_column"], names,
                                                            spec["eval_file"])
            evaluated = encode(raw, labels=eval_labels)
        tasks.append(Task(spec["name"], names, encode(train, labels=labels), evaluated,
                          spec["eval_file"]))
    return tasks


def build_classifier(cfg: DictConfig, tasks: list[Task], source: str | Path) -> Classifier:
    from transformers import AutoModelForSequenceClassification

    first = tasks[0].labels
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=len(first), id2label=dict(enumerate(first)),
        label2id={n: i for i, n in enumerate(first)}, **kwargs)
    h = cfg.head
    spec = HeadSpec(pooling=h.pooling, layers=list(h.layers), layer_combine=h.layer_combine,
                    segment_pooling=h.segment_pooling, dropout=h.dropout,
                    tasks={t.name: t.labels for t in tasks})
    return Classifier(hf, spec, hierarchical=cfg.data.truncation == "segments")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune; return the metrics written to metrics.json."""
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resuming = checkpoint.prepare_output_dir(
        output_dir, resolved, overwrite=cfg.overwrite_output_dir, may_differ=RESUMABLE_KEYS)
    ckpt_root = output_dir / "checkpoints"
    resume_from = checkpoint.latest_checkpoint(ckpt_root) if resuming else None
    if resuming and (output_dir / "metrics.json").is_file():
        logging.getLogger("further_pt").warning("%s already holds a finished run", output_dir)
        return json.loads((output_dir / "metrics.json").read_text())
    source = resume_from or cfg.model.name_or_path
    model_config = model.load_config(str(source), trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = model.load_tokenizer(str(resume_from or cfg.model.tokenizer or source),
                                     trust_remote_code=cfg.model.trust_remote_code)
    model.check_compatible(model_config, tokenizer, cfg.data.max_seq_length, needs_mask=False)

    accelerator = training.make_accelerator(cfg.train.mixed_precision, output_dir / "logs",
                                            find_unused_parameters=True)
    is_main, rank, world = (accelerator.is_main_process, accelerator.process_index,
                            accelerator.num_processes)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with accelerator.main_process_first():
        tasks = load_tasks(cfg, tokenizer)
    if is_main:
        if not resuming:
            checkpoint.write_config(output_dir, resolved, overwrite=cfg.overwrite_output_dir)
        checkpoint.remove_partial(ckpt_root)
    accelerator.wait_for_everyone()

    # Data: one resumable stream per task; a step draws its task in proportion to task size.
    t = cfg.train
    batch_size, accum = t.batch_size, t.gradient_accumulation_steps
    on_gpu = accelerator.device.type == "cuda"
    samplers, loaders = {}, {}
    for task in tasks:
        samplers[task.name] = training.ResumableSampler(
            len(task.train), seed=cfg.seed, rank=rank, world_size=world, batch_size=batch_size,
            lengths=instances.lengths(task.train) if cfg.data.group_by_length else None)
        loaders[task.name] = DataLoader(
            task.train, batch_size=batch_size, sampler=samplers[task.name],
            collate_fn=partial(classification_data.collate, pad_id=tokenizer.pad_token_id),
            num_workers=cfg.data.dataloader_workers, pin_memory=on_gpu,
            generator=torch.Generator().manual_seed(cfg.seed))
    sizes = torch.tensor([float(len(task.train)) for task in tasks])
    steps_per_epoch = sum(math.ceil(math.ceil(s.per_rank / batch_size) / accum)
                          for s in samplers.values())
    if steps_per_epoch == 0:
        raise ConfigError("data.train_file: fewer training examples than processes")
    total_steps = t.epochs * steps_per_epoch

    # Classifier, layer groups, optimizer, schedule, unfreezing.
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        extra = ({"attn_implementation": cfg.model.attn_implementation}
                 if cfg.model.attn_implementation else {})
        classifier = load_classifier(resume_from, **extra)
    else:
        classifier = build_classifier(cfg, tasks, cfg.model.name_or_path)
    if classifier.custom:  # the HF head is unused beside a custom one: keep it out of DDP
        base_ids = {id(p) for p in classifier.model.base_model.parameters()}
        for p in classifier.model.parameters():
            if id(p) not in base_ids:
                p.requires_grad_(False)
    groups = layerwise.layer_groups(classifier, lr=t.lr, xi=t.layer_decay, head_lr=t.head_lr)
    if t.freeze_encoder:  # BERT-Feat: only the head learns
        for group in groups[:-1]:
            for _, p in group.params:
                p.requires_grad_(False)
    groups = [layerwise.LayerGroup(g.name, [(n, p) for n, p in g.params if p.requires_grad], g.lr)
              for g in groups]
    optimizer = torch.optim.AdamW(
        layerwise.optimizer_groups([g for g in groups if g.params], t.weight_decay),
        lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=on_gpu or None)
    scheduler = schedules.build(t.schedule, optimizer, total_steps=total_steps,
                                warmup_steps=round(t.warmup_ratio * total_steps),
                                cut_frac=t.stlr_cut_frac, ratio=t.stlr_ratio)
    unfreezing = None
    if t.unfreeze != "none":
        every = steps_per_epoch if t.unfreeze == "epoch" else t.unfreeze_every_steps
        unfreezing = layerwise.GradualUnfreezing(groups, every)
    if is_main:
        checkpoint.check_writable(output_dir, training.checkpoint_bytes(classifier))
    classifier, optimizer = accelerator.prepare(classifier, optimizer)

    state: dict[str, Any] = {"step": 0, "streams": {task.name: [0, 0] for task in tasks},
                             "best": None, "best_epoch": None, "history": [],
                             "nonfinite_steps": 0}
    if resume_from is not None:
        state.update(checkpoint.load_training_state(resume_from, optimizer, scheduler))
        logger.info("resuming from %s (step %d)", resume_from, state["step"])
    streams = {task.name: training.micro_batches(loaders[task.name], samplers[task.name],
                                                 batch_size, *state["streams"][task.name])
               for task in tasks}

    preprocessing = {k: resolved["data"][k] for k in evaluation.PREPROCESSING_KEYS}

    def save_model(folder: Path) -> None:
        accelerator.unwrap_model(classifier).save(folder, tokenizer)
        (folder / evaluation.PREPROCESSING).write_text(json.dumps(preprocessing, indent=1))

    def evaluate_all() -> dict[str, Any]:
        net = accelerator.unwrap_model(classifier)
        results: dict[str, Any] = {}
        for task in tasks:
            if task.eval is None:
                continue
            loader = DataLoader(task.eval, batch_size=cfg.eval.batch_size, collate_fn=partial(
                classification_data.collate, pad_id=tokenizer.pad_token_id))
            preds, refs, _ = evaluation.predict(net, loader, accelerator.device, task.name)
            prefix = "eval_" if len(tasks) == 1 else f"eval_{task.name}_"
            results.update(evaluation.compute_metrics(preds, refs, task.labels, prefix))
        if len(tasks) > 1 and results:
            for key in ("accuracy", "error_rate", "macro_f1"):
                values = [results[f"eval_{t.name}_{key}"] for t in tasks if t.eval is not None]
                results[f"eval_{key}"] = sum(values) / len(values)
        return results

    log = training.MetricsLog(accelerator, output_dir / "logs", "finetune", resolved)
    step, window_steps = state["step"], 0
    window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # no sync/step
    window_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=not is_main)
    classifier.train()
    watch = training.PreemptionWatch()
    try:
        while step < total_steps:
            torch.manual_seed(training.step_seed(cfg.seed, step, rank))
            gen = torch.Generator().manual_seed(training.step_seed(cfg.seed, step))  # same on ranks
            task = tasks[int(torch.multinomial(sizes, 1, generator=gen))] if len(tasks) > 1 else (
                tasks[0])
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                epoch, position, batch = next(streams[task.name])
                state["streams"][task.name] = [epoch, position]
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                labels = batch.pop("labels")
                sync = (accelerator.no_sync(classifier) if micro < accum - 1
                        else training.nullcontext())
                with sync, accelerator.autocast():
                    loss = F.cross_entropy(classifier(**batch, task=task.name).float(), labels)
                    if faults.nan_from(step + 1):
                        loss = loss * float("nan")
                    accelerator.backward(loss / accum)
                if micro == 0:
                    faults.point("micro", step + 1, rank)
                step_loss += loss.detach() / accum
            if unfreezing is not None:
                unfreezing.drop_frozen_grads(step)
            training.optimizer_step(
                accelerator, classifier.parameters(), optimizer, scheduler, step_loss,
                max_grad_norm=t.max_grad_norm, max_nonfinite=t.max_nonfinite_steps,
                state=state, step=step, ckpt_root=ckpt_root)
            step += 1
            window_loss += step_loss
            window_steps += 1
            bar.update(1)
            faults.point("step", step, rank)
            stop = watch.requested(accelerator)
            if step % t.log_every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                values = {"train/loss": window_loss.item() / window_steps,
                          "train/steps_per_s": window_steps / elapsed,
                          **{f"lr/{k}": v for k, v in layerwise.group_lrs(optimizer).items()}}
                log.log(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if epoch_end or stop:
                epoch_no = math.ceil(step / steps_per_epoch)
                results = evaluate_all() if is_main and epoch_end else {}
                if is_main and results:
                    scalars = {k: v for k, v in results.items() if isinstance(v, int | float)}
                    log.log(step, scalars)
                    state["history"].append({"epoch": epoch_no, "step": step, **scalars})
                    score = results[f"eval_{cfg.eval.metric}"]
                    logger.info("epoch %d: %s", epoch_no, ", ".join(
                        f"{k}={v:.4f}" for k, v in scalars.items() if k.count("_") <= 2))
                    if evaluation.is_better(cfg.eval.metric, score, state["best"]):
                        state["best"], state["best_epoch"] = score, epoch_no
                        def save_best(folder: Path, results: dict = results) -> None:
                            save_model(folder)
                            (folder / "eval_results.json").write_text(json.dumps(results, indent=1))

                        checkpoint.save_model_folder(output_dir / "best", save_best)
                if is_main:
                    checkpoint.save_checkpoint(ckpt_root, step, write_model=save_model,
                                               optimizer=optimizer, scheduler=scheduler,
                                               state={**state, "step": step},
                                               keep_last=cfg.checkpoint.keep_last)
                accelerator.wait_for_everyone()
                faults.point("after_checkpoint", step, rank)
                if stop:
                    raise training.Preempted(
                        f"stopped by a signal at step {step}; checkpoint written to "
                        f"{ckpt_root}; run the same command to resume")
    finally:
        watch.close()
        bar.close()
    metrics: dict[str, Any] = {}
    if is_main:
        best = output_dir / "best"
        if best.is_dir():
            metrics = json.loads((best / "eval_results.json").read_text())
            final_from = f"best epoch {state['best_epoch']} by eval_{cfg.eval.metric}"
            checkpoint.save_model_folder(output_dir / "final",
                                         lambda f: shutil.copytree(best, f, dirs_exist_ok=True))
        else:
            final_from = "last step (no eval_file)"
            checkpoint.save_model_folder(output_dir / "final", save_model)
        metrics.update({"final_model": final_from, "best_epoch": state["best_epoch"],
                        "steps": step, "history": state["history"], "config": resolved})
        checkpoint.atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=1))
    accelerator.wait_for_everyone()
    log.close()
    return metrics


def report(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    lines = []
    if "eval_error_rate" in metrics:
        lines.append(f"dev accuracy {metrics['eval_accuracy']:.4f}, error rate "
                     f"{metrics['eval_error_rate']:.4f}, macro-F1 {metrics['eval_macro_f1']:.4f} "
                     f"({metrics['final_model']})")
    lines.append(f"Final model: {Path(cfg.output_dir).resolve() / 'final'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return training.entry_point(sys.argv[1:] if argv is None else argv, config.FinetuneSchema,
                                run, report)


if __name__ == "__main__":
    sys.exit(main())
