"""FSDP (version 2, torch's fully_shard) on two CPU processes: the same model as DDP, resumable.

Accelerate enters FSDP only on accelerators, so these runs go through
``tests/fsdp_on_cpu.py``, which gives each Accelerator the FSDP2 plugin that
``accelerate launch --use_fsdp --fsdp_version 2`` gives on GPUs (one shard unit per
BertLayer plus the root). What they check is further_pt's side: the weights and
AdamW state gathered for checkpoints, ``final/`` and evaluation, and the optimizer
state cut back into shards on resume.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    free_port,
    leave_process_group,
    pretrain_overrides,
    run_script,
    weights,
    write_task,
)

from further_pt.train.checkpoint import verify
from further_pt.train.launch import torch_release

# FSDP2 on CPU processes needs torch.cpu.Stream.record_event (torch >= 2.7, pytorch#145935);
# the floors set's torch 2.6 refuses it with one line (tests/test_hardware.py checks that).
pytestmark = pytest.mark.skipif(torch_release() < (2, 7),
                                reason="FSDP2 on CPU processes needs torch >= 2.7")


def _launcher(port: int, *, fsdp: bool) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(port)]
    return [*launch, str(REPO / "tests" / "fsdp_on_cpu.py")] if fsdp else launch


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference of two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.smoke
@pytest.mark.slow
def test_fsdp_pretraining_equals_ddp_and_resumes_from_its_checkpoint(
        tmp_path: Path, corpus_file: Path, tiny_model_dir: Path) -> None:
    """6 steps, checkpoint at 3: DDP straight through; FSDP killed after step 4, resumed.

    Also the plain two-process DDP run's own checks (identical replicas, one log per step).
    """
    env = {"ACCELERATE_USE_CPU": "true"}
    runs = {}
    for name, fsdp, fault in (("ddp", False, None), ("fsdp", True, "step:4:1")):
        out = tmp_path / name
        args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / f"cache-{name}",
                                  **{"model.attn_implementation": "sdpa"})
        if fault:
            killed = run_script(args, env={**env, "FURTHER_PT_FAULT": fault},
                                launcher=_launcher(free_port(), fsdp=True))
            assert killed.returncode != 0 and not (out / "final").exists()
            ckpt = out / "checkpoints" / "step-000003"
            assert verify(ckpt) is None
            assert json.loads((ckpt / "trainer_state.json").read_text())["sharded"] is True
            # a whole model, gathered: DDP's own weights at that step
            ddp_ckpt = weights(tmp_path / "ddp" / "checkpoints" / "step-000003")
            assert _close(weights(ckpt), ddp_ckpt) < 1e-4
        proc = run_script(args, env=env, launcher=_launcher(free_port(), fsdp=fsdp))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = proc.stderr
    assert "resuming from" in runs["fsdp"] and "step-000003 (step 3)" in runs["fsdp"]
    assert "weights identical on all 2 processes" in runs["ddp"]  # DDP checks its replicas
    lines = (tmp_path / "ddp" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one log line per logging step, from the main process only
    assert _close(weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp" / "final")
                  ) < 1e-4
    losses = {name: [json.loads(x)["train/mlm_loss"] for x in (
        tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        for name in runs}
    # logged every 2 steps; FSDP's window 3-4 restarted at 3 (resumed), so it holds step 4 only
    assert len(losses["fsdp"]) == 3
    assert [losses["ddp"][i] for i in (0, 2)] == pytest.approx(
        [losses["fsdp"][i] for i in (0, 2)], abs=1e-4)


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact_and_only_rank_0_reads_the_optimizer_state(
        tmp_path: Path, corpus_file: Path, tiny_model_dir: Path) -> None:
    """FSDP straight through vs killed after step 4 and resumed from step 3: the same final
    weights, bit for bit. On resume the main process alone opens optimizer.pt; the other
    receives its shard (set_optimizer_state_dict(..., broadcast_from_rank0=True)). The
    DDP-only train.ddp_comm_hook is ignored under FSDP, with a line saying so."""
    loads = tmp_path / "loads"
    loads.mkdir()
    env = {"ACCELERATE_USE_CPU": "true"}
    finals = {}
    for name, fault in (("straight", None), ("resumed", "step:4:1")):
        out = tmp_path / name
        args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / f"cache-{name}",
                                  **{"model.attn_implementation": "sdpa",
                                     "train.ddp_comm_hook": "fp16"})
        if fault:
            killed = run_script(args, env={**env, "FURTHER_PT_FAULT": fault},
                                launcher=_launcher(free_port(), fsdp=True))
            assert killed.returncode != 0 and not (out / "final").exists()
            assert not list(loads.iterdir())  # a fresh run loads no optimizer state
            proc = run_script(args, env={**env, "FSDP_ON_CPU_LOADS": str(loads)},
                              launcher=_launcher(free_port(), fsdp=True))
            assert "resuming from" in proc.stderr and "step-000003 (step 3)" in proc.stderr
        else:
            proc = run_script(args, env=env, launcher=_launcher(free_port(), fsdp=True))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "train.ddp_comm_hook=fp16 is ignored under FSDP" in proc.stderr
        finals[name] = weights(out / "final")
    opened = {p.name: p.read_text().split() for p in loads.iterdir()}
    assert opened["rank-0.txt"].count("optimizer.pt") == 1
    assert "optimizer.pt" not in opened.get("rank-1.txt", [])
    assert finals["straight"].keys() == finals["resumed"].keys()
    assert all(torch.equal(finals["straight"][k], finals["resumed"][k]) for k in finals["straight"])


@pytest.mark.slow
def test_fsdp_finetuning_evaluates_and_keeps_the_best_epoch(tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    train = write_task(tmp_path / "train.jsonl", 160, 0)
    dev = write_task(tmp_path / "dev.jsonl", 32, 1)
    out = tmp_path / "fit"
    args = ["recipe=fit", f"output_dir={out}", f"model.name_or_path={tiny_model_dir}",
            f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
            "train.epochs=3", "train.batch_size=8", "train.lr=3e-3", "train.head_lr=3e-3",
            "train.layer_decay=1.0", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run_script(args, script="finetune.py", env={"ACCELERATE_USE_CPU": "true"},
                      launcher=_launcher(free_port(), fsdp=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["eval_accuracy"] > 0.9
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").num_labels == 2


def _fp16_frozen_encoder(rank: int, port: int, results: str) -> None:
    """One of two gloo processes: FSDP2, a real fp16 GradScaler, BERT-Feat's frozen encoder.

    Three steps through ``optimizer_step`` with SGD at lr 1 (the update is the clipped
    gradient itself): a finite one clipped to half its norm, one with an inf in rank 1's
    shard of the head's gradient, a finite one. Writes what the parent checks.
    """
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    import fsdp_on_cpu  # noqa: F401  (every Accelerator in this process: FSDP2 over BertLayers)
    from accelerate import Accelerator
    from transformers import BertConfig, BertForSequenceClassification

    from further_pt.train import step as optim_step

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2))
    for p in model.bert.parameters():  # BERT-Feat: only the head learns
        p.requires_grad_(False)
    acc = Accelerator(mixed_precision="fp16")
    # Accelerate builds its fp16 GradScaler on GPUs only; FSDP2's (a plain one) on CPU
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**8), True
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    names = [n for n, _ in model.named_parameters()]
    head = [n for n, p in model.named_parameters() if p.requires_grad]

    def whole() -> dict[str, torch.Tensor]:
        return {n: p.detach().full_tensor().float().clone() for n, p in model.named_parameters()}

    g = torch.Generator().manual_seed(rank)
    out: dict = {"head": head, "steps": []}
    for step in (1, 2, 3):
        ids = torch.randint(1, 50, (4, 8), generator=g)
        with acc.autocast():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
        acc.backward(loss)  # scaled by the scaler
        scale = acc.scaler.get_scale()
        grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()
                 if p.grad is not None}
        unscaled = torch.sqrt(sum(x.pow(2).sum() for x in grads.values())).item() / scale
        if step == 2 and rank == 1:  # an overflow in one process's shard only
            dict(model.named_parameters())["classifier.weight"].grad.to_local().fill_(
                float("inf"))
        before = whole()
        grad_norm, skipped, _ = optim_step.optimizer_step(
            acc, model.parameters(), optimizer, scheduler, loss.detach(),
            max_grad_norm=unscaled / 2)
        after = whole()
        moved = {n: torch.linalg.vector_norm(after[n] - before[n]).item() for n in names}
        out["steps"].append({
            "with_grad": sorted(grads), "unscaled": unscaled, "grad_norm": grad_norm.item(),
            "skipped": skipped.item(), "scale_after": acc.scaler.get_scale(),
            "head_update": math.sqrt(sum(moved[n] ** 2 for n in head)),
            "encoder_moved": max(moved[n] for n in names if n not in head)})
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))
    leave_process_group()


@pytest.mark.slow
def test_fsdp_fp16_with_a_frozen_encoder_unscales_once_and_clips_the_head(tmp_path: Path
                                                                          ) -> None:
    """Issue 27 item 4: under FSDP2 with a GradScaler, a clip over other than the model's whole
    parameter list made Accelerate unscale twice ("unscale_() has already been called").
    Here: the unscaled norm of the head's gradient, the head's update clipped to half of it,
    the encoder still, an overflow in one shard skipped by both processes, the scale halved."""
    import torch.multiprocessing as mp

    mp.start_processes(_fp16_frozen_encoder, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same norm, decisions and weights in both processes
    head, steps = ranks[0]["head"], ranks[0]["steps"]
    assert head == ["classifier.weight", "classifier.bias"]
    for s in steps:
        assert s["with_grad"] == sorted(head)
        assert s["encoder_moved"] == 0.0
    first, overflow, third = steps
    # unscaled exactly once: not x256 (never unscaled), not /256 (unscaled twice)
    assert first["grad_norm"] == pytest.approx(first["unscaled"], rel=1e-5)
    assert first["head_update"] == pytest.approx(first["unscaled"] / 2, rel=1e-4)
    assert (first["skipped"], first["scale_after"]) == (0.0, 2.0**8)
    assert overflow["skipped"] == 1.0 and not math.isfinite(overflow["grad_norm"])
    assert (overflow["head_update"], overflow["scale_after"]) == (0.0, 2.0**7)
    assert third["grad_norm"] == pytest.approx(third["unscaled"], rel=1e-5)
    assert third["head_update"] == pytest.approx(third["unscaled"] / 2, rel=1e-4)
    assert (third["skipped"], third["scale_after"]) == (0.0, 2.0**7)
