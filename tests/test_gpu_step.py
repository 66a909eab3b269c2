"""The GPU step, proved on CPUs: fp16 overflows, no host syncs, one decision per job.

Each test names the issue-19 item it proves. The distributed ones run two gloo processes
(``accelerate launch --multi_gpu`` with ``ACCELERATE_USE_CPU``), as the GPU job would run
two NCCL ones.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import free_port, leave_process_group, pretrain_overrides, run_script

from further_pt.data import order
from further_pt.errors import ConfigError, SetupError, TrainingFailed
from further_pt.train import checkpoint, launch
from further_pt.train import step as optim_step


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Tests here build Accelerators in this process; later in-process runs (other files)
    must find Accelerate's process-wide state as a new process would."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _launcher(n: int) -> list[str]:
    if n == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(n), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def _pretrain(args: list[str], processes: int, env: dict[str, str] | None = None):
    return run_script(args, launcher=_launcher(processes), timeout=300,
                      env={"ACCELERATE_USE_CPU": "true", **(env or {})})


# ---------------------------------------------------------------- 1. fp16 overflows


def _tiny_step_setup(scaler: bool):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    acc = Accelerator(cpu=True)
    if scaler:  # Accelerate builds a GradScaler for fp16 on GPUs only; the same one on CPU
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        acc.native_amp = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return acc, model, optimizer, scheduler


@pytest.mark.smoke
def test_fp16_overflow_is_skipped_by_the_scaler_and_the_run_goes_on() -> None:
    """Item 1: a real GradScaler, inf gradients at steps 2 and 3: every step calls
    optimizer.step() (no "unscale_() has already been called"), the skips are counted, the
    scale halves at each, and the weights move only on the finite steps."""
    acc, model, optimizer, scheduler = _tiny_step_setup(scaler=True)
    x = torch.randn(8, 4)
    skips = optim_step.NonfiniteSteps(torch.device("cpu"), limit=3, state={})
    scales, skipped_at = [], []
    for step in range(1, 6):
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(x).pow(2).mean()
        acc.backward(loss)  # Accelerate scales the loss by the scaler
        if step in (2, 3):
            next(model.parameters()).grad.fill_(float("inf"))
        _, skipped, counted = optim_step.optimizer_step(acc, model.parameters(), optimizer,
                                                        scheduler, loss.detach(), max_grad_norm=1.0)
        skips.add(skipped, counted, step)
        scales.append(acc.scaler.get_scale())
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                          strict=True))
        if skipped.item():
            skipped_at.append(step)
        assert moved != bool(skipped.item()), step
    assert skipped_at == [2, 3]
    assert scales[:3] == [2.0**16, 2.0**15, 2.0**14]
    state: dict = {}
    skips.read(state, 5, Path("ckpt"))  # overflowing gradients do not count toward the limit
    assert state == {"nonfinite_steps": 2, "nonfinite_run": 0}


@pytest.mark.smoke
def test_bf16_fp32_guard_skips_on_the_device_without_reading_it(monkeypatch) -> None:
    """Item 5: with fused AdamW the non-finite guard is the kernel's found_inf: no .item(), and
    weights, moments and the step count stay as they were."""
    acc, model, optimizer, scheduler = _tiny_step_setup(scaler=False)
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    acc.backward(loss)
    _, skipped, _ = optim_step.optimizer_step(acc, model.parameters(), optimizer, scheduler,
                                              loss.detach(), max_grad_norm=1.0)
    assert skipped.item() == 0
    inner = optimizer.optimizer
    before = {k: v.clone() for k, v in inner.state[next(model.parameters())].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    loss = model(x).pow(2).mean() * float("nan")
    acc.backward(loss)

    def no_host_read(self, *args, **kwargs):
        raise AssertionError("the guard read the device")

    for host_read in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, host_read, no_host_read)
    _, skipped, counted = optim_step.optimizer_step(acc, model.parameters(), optimizer, scheduler,
                                                    loss.detach(), max_grad_norm=1.0)
    monkeypatch.undo()
    assert skipped.item() == counted.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    after = inner.state[next(model.parameters())]
    assert all(torch.equal(before[k], after[k]) for k in before)  # moments and step count
    assert not hasattr(inner, "found_inf")


def test_nonfinite_limit_names_the_step_it_was_reached_at() -> None:
    skips = optim_step.NonfiniteSteps(torch.device("cpu"), limit=2, state={})
    for step, bad in enumerate([0, 1, 0, 1, 1, 1], start=1):
        flag = torch.tensor(float(bad))
        skips.add(flag, flag, step)
    with pytest.raises(TrainingFailed, match=r"^2 non-finite steps in a row at step 5; stopped"):
        skips.read({}, 6, Path("ckpt"))


def test_fp16_fsdp_clip_over_trainable_parameters_unscales_once() -> None:
    """Issue 27 item 4, in one process: Accelerate's FSDP2 branch of clip_grad_norm_ unscales,
    then clips only a list equal to a prepared model's parameters(); any other list (the
    ones with gradients, under a frozen layer or a head warm-up) was unscaled a second time
    and the GradScaler raised. The step hands it the whole list; the clip still covers only
    the parameters with gradients, unscaled once. (Real sharding: tests/test_fsdp.py.)"""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)  # a frozen encoder
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**8), True
    optimizer = torch.optim.SGD(model[1].parameters(), lr=1.0)  # the update is the gradient
    model, optimizer = acc.prepare(model, optimizer)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc.state.distributed_type = DistributedType.FSDP  # clip_grad_norm_'s FSDP2 branch
    assert acc.is_fsdp2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    x = torch.randn(8, 4)
    for step in (1, 2):
        acc.backward(model(x).pow(2).mean())
        if step == 2:  # a head warm-up drops a trainable parameter's gradient
            model[1].bias.grad = None
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        unscaled = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item() / 2.0**8
        before = [p.detach().clone() for p in model.parameters()]
        grad_norm, skipped, _ = optim_step.optimizer_step(
            acc, model.parameters(), optimizer, scheduler, torch.tensor(1.0),
            max_grad_norm=unscaled / 2)
        moved = [torch.linalg.vector_norm(p.detach() - b).item()
                 for p, b in zip(model.parameters(), before, strict=True)]
        assert grad_norm.item() == pytest.approx(unscaled, rel=1e-5)  # not x256, not /256
        assert math.hypot(*moved) == pytest.approx(unscaled / 2, rel=1e-4)  # clipped to half
        assert moved[:2] == [0.0, 0.0]  # the frozen layer
        assert (moved[3] == 0.0) == (step == 2)  # the dropped gradient
        assert (skipped.item(), acc.scaler.get_scale()) == (0.0, 2.0**8)


# ---------------------------------------------------------------- 5. the stop flag


def test_stop_signal_is_agreed_every_n_steps_not_every_step() -> None:
    """Item 5: under several processes the flag's all-reduce (a host read) runs at multiples of
    train.stop_check_every_steps only; one process reads its own flag at every step."""
    reduced: list[int] = []

    def reduce(tensor, op):
        reduced.append(1)
        return tensor

    watch = launch.PreemptionWatch(every=10)
    try:
        acc = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
        watch.received = 15
        assert [s for s in range(1, 31) if watch.requested(acc, s)] == [10, 20, 30]
        assert len(reduced) == 3
        single = SimpleNamespace(num_processes=1)
        assert watch.requested(single, 7)
    finally:
        watch.close()


# ---------------------------------------------------------------- 8. the global batch


@pytest.mark.parametrize(("batch", "accum", "global_", "world", "expected"), [
    (32, 1, None, 8, (32, 1)),  # per device: the global batch grows to 256
    (32, 1, 32, 1, (32, 1)),
    (32, 1, 32, 8, (4, 1)),  # the paper's 32 on 8 GPUs
    (16, 1, 32, 1, (16, 2)),  # memory-bound: accumulate
    (12, 1, 32, 1, (8, 4)),  # the fewest micro-batches of at most 12 that divide 32
    (4, 1, 32, 2, (4, 4)),
])
def test_global_batch_is_resolved_per_world_size(batch, accum, global_, world, expected) -> None:
    micro, steps, line = optim_step.resolve_batch(batch, accum, global_, world)
    assert (micro, steps) == expected
    assert micro * steps * world == (global_ or batch * accum * world)
    assert line.startswith(f"global batch {micro * steps * world} = {world} process(es) x "
                           f"{micro} per device x {steps} accumulation step(s)")


def test_a_global_batch_that_does_not_divide_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 does not divide evenly "
                                          r"over 3 process\(es\)"):
        optim_step.resolve_batch(32, 1, 32, 3)
    with pytest.raises(ConfigError, match=r"train\.gradient_accumulation_steps"):
        optim_step.resolve_batch(8, 2, 32, 1)


# ---------------------------------------------------------------- 4. world size on resume


def test_data_position_converts_to_another_world_size_exactly() -> None:
    """Item 4: after p micro-batches of b on w processes the job read the epoch's first
    p*b*w examples; resumed on w' processes, the ranks together read exactly the rest."""
    n, seed = 96, 3
    old = [order.ResumableSampler(n, seed=seed, rank=r, world_size=2) for r in range(2)]
    read = {i for s in old for i in s.order()[:3 * 4].tolist()}  # 3 micro-batches of 4
    saved = {"world_size": 2, "micro_batch_size": 4, "global_batch": 8,
             "streams": {"corpus": [0, 3]}}
    positions, note = optim_step.resume_positions(saved, world=1, batch_size=8, accumulation=1,
                                                  grouped=False)
    assert positions == {"corpus": [0, 3]} and "example 24 of epoch 0" in note
    new = order.ResumableSampler(n, seed=seed, rank=0, world_size=1)
    new.set_position(0, positions["corpus"][1] * 8)
    rest = list(new)
    assert set(rest).isdisjoint(read) and len(read) + len(rest) == n
    # 1 -> 4 processes, 2 per device: 24 examples = 3 micro-batches of 2 x 4
    positions, _ = optim_step.resume_positions(
        {**saved, "world_size": 1, "micro_batch_size": 8}, world=4, batch_size=2,
        accumulation=1, grouped=False)
    assert positions == {"corpus": [0, 3]}
    assert optim_step.resume_positions(saved, world=2, batch_size=4, accumulation=2,
                                       grouped=True) == ({"corpus": [0, 3]}, None)
    # the same world with another micro-batch (a GPU with less memory): the same conversion
    positions, note = optim_step.resume_positions(saved, world=2, batch_size=2, accumulation=2,
                                                  grouped=False)
    assert positions == {"corpus": [0, 6]} and "(4 per device) on 2 process(es) (2 per" in note
    with pytest.raises(ConfigError, match=r"^the checkpoint's micro-batch is 4 per device and "
                                          r"this run's is 2: data\.group_by_length"):
        optim_step.resume_positions(saved, world=2, batch_size=2, accumulation=2, grouped=True)


@pytest.mark.parametrize(("change", "match"), [
    ({"world": 1, "batch_size": 4}, "the global batch would change from 8 to 4"),
    ({"world": 1, "batch_size": 8, "grouped": True}, "data.group_by_length groups batches"),
    ({"world": 3, "batch_size": 8}, "the global batch would change from 8 to 24"),
])
def test_another_world_size_is_refused_naming_both(change, match) -> None:
    saved = {"world_size": 2, "micro_batch_size": 4, "global_batch": 8,
             "streams": {"corpus": [0, 3]}}
    kwargs = {"accumulation": 1, "grouped": False, **change}
    with pytest.raises(ConfigError, match=rf"^the checkpoint was written by 2 process\(es\) and "
                                          rf"this run has {change['world']}: {match}"):
        optim_step.resume_positions(saved, **kwargs)


@pytest.mark.slow
def test_resume_from_one_process_on_two_and_back(tmp_path, corpus_file, tiny_model_dir) -> None:
    """Item 4 end to end: 1 process killed after step 3 (checkpoint 2) -> resumed on 2,
    killed after step 5 (checkpoint 4) -> resumed on 1 to the end; the global batch stays 4."""
    out = tmp_path / "run"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / "cache", **{
        "data.group_by_length": "false", "train.global_batch_size": 4, "train.max_steps": 6,
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 3})
    first = _pretrain(args, 1, {"FURTHER_PT_FAULT": "step:3"})
    assert first.returncode != 0 and (out / "checkpoints" / "step-000002").is_dir()
    second = _pretrain(args, 2, {"FURTHER_PT_FAULT": "step:5"})
    assert "resuming a 1-process checkpoint (4 per device) on 2 process(es) (2 per device), " \
           "global batch 4 kept; data position corpus: example 8 of epoch 0" in second.stderr, (
               second.stderr[-3000:])
    assert "global batch 4 = 2 process(es) x 2 per device x 1 accumulation step(s)" in (
        second.stderr)
    third = _pretrain(args, 1)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming a 2-process checkpoint (2 per device) on 1 process(es) (4 per device), " \
           "global batch 4 kept; data position corpus: example 16 of epoch 0" in third.stderr, (
               third.stderr[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (1, 4)


# ---------------------------------------------------------------- 3. one checkpoint choice


def _agree(rank: int, store_dir: str, root: str, result_dir: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(Path(store_dir) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)

    def broadcast(objects: list) -> list:
        dist.broadcast_object_list(objects, src=0)
        return objects

    ckpts = Path(root)
    # Rank 1's view lags (NFS): it has not seen step 6 yet and picks step 4.
    mine = ckpts / ("step-000006" if rank == 0 else "step-000004")
    chosen = checkpoint.agree_on_checkpoint(mine, rank=rank, broadcast=broadcast, root=ckpts)
    (Path(result_dir) / f"rank{rank}").write_text(str(chosen))
    leave_process_group()


def test_every_process_resumes_the_main_processs_checkpoint(tmp_path, monkeypatch) -> None:
    """Item 3: rank 0 decides (checksums); the others get its choice by broadcast and check
    sizes only: no SHA-256 of every file on every rank."""
    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * step)
        checkpoint.write_manifest(folder)
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_agree, args=(str(tmp_path), str(root), str(results)), nprocs=2,
                       start_method="spawn")
    assert {(results / f"rank{r}").read_text() for r in range(2)} == {str(root / "step-000006")}

    def hashed(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(checkpoint, "_sha256", hashed)
    assert checkpoint.latest_checkpoint(root, checksums=False) == root / "step-000006"
    (root / "step-000006" / "model.safetensors").write_bytes(b"cut")  # a partial copy
    assert checkpoint.latest_checkpoint(root, checksums=False) == root / "step-000004"
    with pytest.raises(SetupError, match=r"cannot resume from .*step-000006, the checkpoint "
                                         r"the main process chose: model\.safetensors has 3 "):
        checkpoint.agree_on_checkpoint(root / "step-000004", rank=1, root=root,
                                       broadcast=lambda objs: ["step-000006"])


# ---------------------------------------------------------------- 2. preparation


@pytest.mark.slow
def test_preparation_longer_than_the_collective_timeout_completes(tmp_path, docs,
                                                                  tiny_model_dir) -> None:
    """Item 2: 2 processes, a 3 s collective timeout, a corpus that takes longer than that to
    tokenize on one worker: rank 1 waits on a file lock (no timeout), not in a barrier, then
    loads rank 0's cache. Before, rank 1's barrier timed out and the job died."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(docs * 100) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = pretrain_overrides(out, corpus, tiny_model_dir, tmp_path / "cache", **{
        "data.max_documents": "null", "data.preprocessing_workers": 1,
        "train.collective_timeout_s": 3, "train.max_steps": 2, "checkpoint.every_steps": 2})
    proc = _pretrain(args, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building NSP instances" in proc.stderr  # built here, by one process, under a lock
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_preprocessing_workers_auto_is_the_cores_this_process_may_use(monkeypatch) -> None:
    from further_pt.data import corpus, prepare

    monkeypatch.setattr(corpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert prepare.preprocessing_workers("auto", 1_000_000) == 4
    assert prepare.preprocessing_workers("auto", 5_000) == 2  # a worker per 2,000 documents
    assert prepare.preprocessing_workers("auto", 10) == 1
    assert prepare.preprocessing_workers(3, 10) == 3


# ---------------------------------------------------------------- 10. a lost peer under NCCL


@pytest.mark.parametrize("text", [
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType="
    "ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=1800000) ran for 1800081 milliseconds before "
    "timing out.",
    "NCCL communicator was aborted on rank 0. Original reason for failure was: NCCL Error 6: "
    "remote process exited or there was a network error",
])
def test_a_lost_nccl_peer_is_the_same_one_line(text: str) -> None:
    failed = launch.lost_peers(RuntimeError(text), world=8, step=41, timeout_s=1800,
                               ckpt_root=Path("/runs/x/checkpoints"))
    assert failed is not None
    line = str(failed)
    assert line.startswith("lost contact with the other processes during step 42 (")
    assert "rerun the same command on every node to resume" in line and "\n" not in line
    assert launch.lost_peers(RuntimeError(text), world=1, step=41, timeout_s=1,
                             ckpt_root=Path("x")) is None
    assert launch.lost_peers(RuntimeError("CUDA out of memory"), world=8, step=41,
                             timeout_s=1, ckpt_root=Path("x")) is None


def test_nccl_watchdog_aborts_the_communicator_not_the_process(monkeypatch, tmp_path) -> None:
    """Item 10: TORCH_NCCL_ASYNC_ERROR_HANDLING=2 is set before the process group exists, so a
    timeout raises in the step (our line, exit 3) instead of a SIGABRT; a user's value wins."""
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    launch.make_accelerator(None, tmp_path / "logs")  # None: whatever state this process has
    import os

    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    launch.make_accelerator(None, tmp_path / "logs")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


# ---------------------------------------------------------------- 9. fine-tuning on GPUs


@pytest.mark.parametrize(("overrides", "unused"), [
    ([], False),  # the standard head: every parameter gets a gradient
    (["head.pooling=mean"], True),  # the pooler is left out
    (["head.layers=[-2]"], True),  # the top layer is left out
])
def test_ddp_searches_unused_parameters_only_for_custom_heads(tmp_path, tiny_model_dir,
                                                              overrides, unused) -> None:
    from helpers import write_task

    from further_pt.config import recipes, validate
    from further_pt.objectives.classification import Classification

    train = write_task(tmp_path / "train.jsonl", 20, 0)
    cfg = recipes.load(["recipe=fit", f"output_dir={tmp_path / 'out'}",
                       f"model.name_or_path={tiny_model_dir}", f"data.train_file={train}",
                        "data.max_seq_length=32", *overrides],
                       recipes.FinetuneSchema, kind="finetune", validate=validate.validate_finetune)
    assert Classification(cfg, None).find_unused_parameters is unused


def test_gpu_batches_are_padded_to_multiples_of_eight() -> None:
    from further_pt.data.segments import collate

    rows = [{"input_ids": [5] * n, "token_type_ids": [0] * n, "labels": 0} for n in (3, 11)]
    assert collate(rows, pad_id=0)["input_ids"].shape == (2, 11)
    batch = collate(rows, pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 14  # padding is masked out


def test_predict_runs_on_the_gpu_when_there_is_one(monkeypatch, tmp_path, tiny_model_dir
                                                   ) -> None:
    """On a GPU predict uses it, pads batches to multiples of 8 and runs under bf16 autocast."""
    from further_pt.objectives import prediction

    seen: list[torch.device] = []

    class Stop(Exception):
        """Ends predict_file at its first batch, once the device is known."""

    def fake_probabilities(classifier, encoded, tasks, *, batch_size, device, pad_id,
                           task_kinds=None):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(prediction, "probabilities", fake_probabilities)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a b"}\n')
    with pytest.raises(Stop):
        prediction.predict_file(tiny_model_dir, str(data), tmp_path / "out.jsonl")
    assert seen == [torch.device("cuda")]
    pad, autocast = prediction.device_settings(torch.device("cuda"))
    assert pad == 8
    assert autocast().fast_dtype == torch.bfloat16
    assert prediction.device_settings(torch.device("cpu"))[0] is None
