"""Further pretraining (MLM + optional NSP) of a BERT-style encoder, with Accelerate.

    accelerate launch further_pt/pretrain.py recipe=in_domain data.train_files=[corpus/*.txt.gz]

Recipes: ``within_task`` (ITPT), ``in_domain`` (IDPT), ``cross_domain`` (CDPT),
``demo`` (offline, tiny, minutes on a CPU). Any ``key=value`` overrides a recipe
key. Re-running the same command resumes from the newest complete checkpoint.

The script reads top to bottom: config -> output dir -> tokenizer and model
config -> corpus -> instances -> model and optimizer -> (resume) -> the loop
-> final model. Every stage lives in the module named after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

# Entry point used as a script (`accelerate launch further_pt/pretrain.py`): the
# package must be importable by its name, not through this folder on sys.path.
if __package__ in (None, "") and sys.path and Path(sys.path[0]).name == "further_pt":
    sys.path.pop(0)

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from further_pt import checkpoint, config, corpus, faults, instances, masking, model, training
from further_pt.config import ConfigError
from further_pt.objective import PretrainingObjective, unwrap

logger = logging.getLogger("further_pt.pretrain")

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_KEYS = (
    "output_dir", "overwrite_output_dir", "train.max_steps", "train.log_every_steps",
    "checkpoint.every_steps",
    "checkpoint.keep_last", "data.dataloader_workers", "data.preprocessing_workers",
    "data.cache_dir",
)


def prepare_tokenizer(cfg: DictConfig, docs: list[Any], output_dir: Path,
                      resume_from: Path | None, accelerator: Any) -> Any:
    """The checkpoint's tokenizer, the model's, or (from scratch) one trained on the corpus.

    Only the from-scratch case needs ``docs`` and the ``accelerator`` (the main
    process trains and saves, the others wait and load).
    """
    if resume_from is not None:
        return model.load_tokenizer(str(resume_from))
    if cfg.model.from_scratch is None:
        name = cfg.model.tokenizer or cfg.model.name_or_path
        return model.load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)
    folder = output_dir / "tokenizer"
    with accelerator.main_process_first():
        if not (folder / "tokenizer.json").is_file() and accelerator.is_main_process:
            fs = cfg.model.from_scratch
            per_source = math.ceil(fs.tokenizer_training_docs / len(docs))
            texts = (text for d in docs for text in islice(
                (row["text"] for row in d), per_source))
            tok = model.train_wordpiece(texts, vocab_size=fs.vocab_size, lowercase=fs.lowercase,
                                        max_seq_length=fs.max_position_embeddings)
            tok.save_pretrained(folder)
        return model.load_tokenizer(str(folder))


def _finished(ckpt: Path, max_steps: int, output_dir: Path) -> bool:
    """A run is finished when its newest checkpoint is at max_steps and final/ is intact."""
    return (checkpoint.step_of(ckpt) >= max_steps
            and checkpoint.verify(output_dir / "final") is None)


def run(cfg: DictConfig) -> Path:
    """Train; return the path of the final model folder."""
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    resolved = OmegaConf.to_container(cfg, resolve=True)

    # Read-only checks first, on every process, before Accelerate, data or weights.
    resuming = checkpoint.prepare_output_dir(
        output_dir, resolved, overwrite=cfg.overwrite_output_dir, may_differ=RESUMABLE_KEYS)
    sources = corpus.resolve_sources(cfg.data.train_files)
    ckpt_root = output_dir / "checkpoints"
    resume_from = checkpoint.latest_checkpoint(ckpt_root) if resuming else None
    if resume_from is not None:
        model_config = model.load_config(str(resume_from))
    elif cfg.model.from_scratch is None:
        model_config = model.load_config(cfg.model.name_or_path,
                                         trust_remote_code=cfg.model.trust_remote_code)
    else:
        model_config = None  # built once the tokenizer is trained
    tokenizer = None
    if model_config is not None:  # a given model: its heads, positions and vocabulary
        model.pretraining_class(model_config, cfg.objective.nsp)
        tokenizer = prepare_tokenizer(cfg, [], output_dir, resume_from, None)
        model.check_compatible(model_config, tokenizer, cfg.data.max_seq_length)
    if resume_from is not None and _finished(resume_from, cfg.train.max_steps, output_dir):
        logging.getLogger("further_pt").warning(
            "%s already holds a finished run of %d steps: nothing to do", output_dir,
            cfg.train.max_steps)
        return output_dir / "final"

    accelerator = training.make_accelerator(cfg.train.mixed_precision, output_dir / "logs")
    is_main, rank, world = (accelerator.is_main_process, accelerator.process_index,
                            accelerator.num_processes)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Corpus -> documents (one dataset per source) -> tokenizer -> instances, mixed by weight.
    cache_dir = corpus.default_cache_dir(cfg.data.cache_dir)
    with accelerator.main_process_first():
        docs = [corpus.load_documents(s, txt_documents=cfg.data.txt_documents,
                                      text_column=cfg.data.text_column, cache_dir=cache_dir,
                                      max_documents=cfg.data.max_documents) for s in sources]
    # The input is readable: only now does the run claim its output dir.
    if is_main:
        if not resuming:
            checkpoint.write_config(output_dir, resolved, overwrite=cfg.overwrite_output_dir)
        checkpoint.remove_partial(ckpt_root)
    accelerator.wait_for_everyone()
    if tokenizer is None:
        tokenizer = prepare_tokenizer(cfg, docs, output_dir, resume_from, accelerator)
    if model_config is None:  # from scratch: the config follows the trained tokenizer
        model_config = model.scratch_config(cfg, tokenizer)
        model.pretraining_class(model_config, cfg.objective.nsp)
    with accelerator.main_process_first():
        per_source = [instances.build_instances(
            d, tokenizer, nsp=cfg.objective.nsp, max_seq_length=cfg.data.max_seq_length,
            short_seq_prob=cfg.data.short_seq_prob, txt_documents=cfg.data.txt_documents,
            seed=cfg.seed, num_proc=cfg.data.preprocessing_workers) for d in docs]
    train_set = corpus.mix(per_source, cfg.data.source_weights, cfg.seed)

    batch_size, accum = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
    sampler = training.ResumableSampler(
        len(train_set), seed=cfg.seed, rank=rank, world_size=world,
        lengths=instances.lengths(train_set) if cfg.data.group_by_length else None,
        batch_size=batch_size)
    micro_per_epoch = sampler.per_rank // batch_size
    if micro_per_epoch == 0:
        raise ConfigError(
            f"data.train_files: the corpus gives {len(train_set)} instances, fewer than one "
            f"batch of {batch_size} x {world} process(es); add text or lower train.batch_size")
    on_gpu = accelerator.device.type == "cuda"
    loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
        collate_fn=partial(instances.collate, pad_id=tokenizer.pad_token_id,
                           pad_to_multiple_of=8 if on_gpu else None),
        num_workers=cfg.data.dataloader_workers, pin_memory=on_gpu,
        # Its own generator: a new DataLoader iterator otherwise draws from the global RNG,
        # which would shift dropout after a resume.
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    # Model, optimizer, schedule. Every rank builds the same weights from the same seed.
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model
    if resume_from is not None:
        net = model.load_pretraining_model(resume_from, model_config, nsp=cfg.objective.nsp,
                                           attn_implementation=mcfg.attn_implementation,
                                           trust_remote_code=mcfg.trust_remote_code)
    elif mcfg.from_scratch is not None:
        net = model.new_pretraining_model(model_config, nsp=cfg.objective.nsp,
                                          attn_implementation=mcfg.attn_implementation)
    else:
        net = model.load_pretraining_model(mcfg.name_or_path, model_config,
                                           nsp=cfg.objective.nsp,
                                           attn_implementation=mcfg.attn_implementation,
                                           trust_remote_code=mcfg.trust_remote_code)
    objective = PretrainingObjective(net, nsp=cfg.objective.nsp)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        training.param_groups(objective.parameters(), t.weight_decay), lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=on_gpu or None)
    from transformers import get_linear_schedule_with_warmup
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    if is_main:
        checkpoint.check_writable(output_dir, training.checkpoint_bytes(objective))
    objective, optimizer = accelerator.prepare(objective, optimizer)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "tokens": 0,
                             "nonfinite_steps": 0}
    if resume_from is not None:
        state.update(checkpoint.load_training_state(resume_from, optimizer, scheduler))
        logger.info("resuming from %s (step %d)", resume_from, state["step"])
    elif resuming:
        logger.info("no complete checkpoint in %s: starting from step 0", ckpt_root)

    special_ids = masking.special_ids_tensor(tokenizer).to(accelerator.device)
    continuation = (masking.word_continuation_table(tokenizer)
                    if cfg.objective.whole_word_masking else None)
    mask = partial(masking.mask_tokens, special_ids=special_ids,
                   mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                   masked_lm_prob=cfg.objective.masked_lm_prob,
                   max_predictions=cfg.objective.max_predictions_per_seq,
                   continuation=continuation)

    def write_model(folder: Path) -> None:
        model.save_folder(unwrap(objective, accelerator), tokenizer, folder)

    log = training.MetricsLog(accelerator, output_dir / "logs", "pretrain", resolved)
    stream = training.micro_batches(loader, sampler, batch_size, state["epoch"],
                                    state["position"])
    step = state["step"]
    # Logging window, on the device: MLM loss, NSP loss, NSP correct, NSP pairs, tokens.
    window = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    window_steps, window_start = 0, time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=step, desc="pretrain", unit="step",
               disable=not is_main, dynamic_ncols=True)
    objective.train()
    watch = training.PreemptionWatch()
    try:
        while step < t.max_steps:
            torch.manual_seed(training.step_seed(cfg.seed, step, rank))  # dropout: f(seed, step)
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                state["epoch"], state["position"], batch = next(stream)
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                gen = torch.Generator(device=accelerator.device).manual_seed(
                    training.step_seed(cfg.seed, step, rank, micro))
                masked_ids, labels = mask(batch["input_ids"], batch["attention_mask"],
                                          generator=gen)
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(
                    objective)
                with sync, accelerator.autocast():
                    losses = objective(masked_ids, batch["attention_mask"], batch["token_type_ids"],
                                       labels, batch.get("next_sentence_label"))
                    if faults.nan_from(step + 1):
                        losses.total = losses.total * float("nan")
                    accelerator.backward(losses.total / accum)
                if micro == 0:
                    faults.point("micro", step + 1, rank)
                step_loss += losses.total.detach() / accum
                # Summed on the device; read once per logging interval (no sync per step).
                window[0] += losses.mlm.detach() / accum
                if losses.nsp is not None:
                    window[1] += losses.nsp.detach() / accum
                    window[2] += losses.nsp_correct
                    window[3] += labels.shape[0]
                window[4] += batch["attention_mask"].sum()
            grad_norm = training.optimizer_step(
                accelerator, objective.parameters(), optimizer, scheduler, step_loss,
                max_grad_norm=t.max_grad_norm, max_nonfinite=t.max_nonfinite_steps,
                state=state, step=step, ckpt_root=ckpt_root)
            step += 1
            window_steps += 1
            bar.update(1)
            faults.point("step", step, rank)
            stop = watch.requested(accelerator)
            if step % t.log_every_steps == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                totals = accelerator.reduce(window, reduction="sum").tolist()
                n = window_steps * world
                values = {"train/mlm_loss": totals[0] / n, "train/lr": scheduler.get_last_lr()[0],
                          "train/tokens_per_s": totals[4] / elapsed,
                          "train/steps_per_s": window_steps / elapsed,
                          "train/grad_norm": float(grad_norm)}
                if cfg.objective.nsp:
                    values["train/nsp_loss"] = totals[1] / n
                    values["train/nsp_accuracy"] = totals[2] / max(totals[3], 1)
                state["tokens"] += int(totals[4])
                log.log(step, values)
                bar.set_postfix(mlm=f"{values['train/mlm_loss']:.3f}",
                                tok_s=f"{values['train/tokens_per_s']:.0f}")
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if step % cfg.checkpoint.every_steps == 0 or step == t.max_steps or stop:
                if is_main:
                    saved = checkpoint.save_checkpoint(
                        ckpt_root, step, write_model=write_model, optimizer=optimizer,
                        scheduler=scheduler, state={**state, "step": step},
                        keep_last=cfg.checkpoint.keep_last)
                accelerator.wait_for_everyone()
                faults.point("after_checkpoint", step, rank)
                if stop:
                    where = f" to {saved}" if is_main else ""
                    raise training.Preempted(f"stopped by a signal at step {step}; checkpoint "
                                             f"written{where}; run the same command to resume")
    finally:
        watch.close()
        bar.close()
    # DDP keeps replicas in sync; prove it before writing the final model.
    checksum = torch.stack([p.detach().double().sum() for p in objective.parameters()]).sum()
    sums = accelerator.gather(checksum.reshape(1)).tolist()
    if len(set(sums)) != 1:
        raise training.TrainingFailed(f"the {world} processes ended with different weights: {sums}")
    if world > 1:
        logger.info("weights identical on all %d processes (checksum %.6f)", world, sums[0])
    final = output_dir / "final"
    if is_main:
        checkpoint.save_model_folder(final, write_model)
    accelerator.wait_for_everyone()
    log.close()  # ends Accelerate's trackers and the process group: last
    return final


def report(cfg: DictConfig, final: Path) -> str:
    return (f"Final model: {final}\n"
            f"  as a masked LM:  AutoModelForMaskedLM.from_pretrained({str(final)!r})\n"
            f"  to fine-tune:    accelerate launch further_pt/finetune.py recipe=fit "
            f"model.name_or_path={final} data.train_file=... data.eval_file=...")


def main(argv: list[str] | None = None) -> int:
    return training.entry_point(sys.argv[1:] if argv is None else argv, config.PretrainSchema,
                                run, report)


if __name__ == "__main__":
    sys.exit(main())
