"""Eight GPUs at the paper's batch: a compressed gradient all-reduce, doctor's projection of a
corpus recipe's run, fine-tuning data prepared under the file lock, FSDP optimizer state
read by one process.

The multi-process cases run on two CPU processes (gloo) through ``accelerate launch``, as a
DDP job on GPUs does through NCCL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import free_port

from further_pt.config import recipes, validate
from further_pt.errors import ConfigError, SetupError
from further_pt.train import launch

# ---------------------------------------------------------------- train.ddp_comm_hook


def test_ddp_comm_hook_key_builds_accelerates_ddp_handler() -> None:
    from accelerate.utils import DDPCommunicationHookType as Hook

    assert launch.ddp_kwargs() is None  # the defaults: Accelerate's own DDP settings
    bf16 = launch.ddp_kwargs(comm_hook="bf16")
    assert bf16 is not None and bf16.comm_hook is Hook.BF16
    assert not bf16.find_unused_parameters
    fp16 = launch.ddp_kwargs(find_unused_parameters=True, comm_hook="fp16")
    assert fp16 is not None and fp16.comm_hook is Hook.FP16 and fp16.find_unused_parameters
    unused = launch.ddp_kwargs(find_unused_parameters=True)
    assert unused is not None and unused.comm_hook is Hook.NO
    with pytest.raises(SetupError, match=r"'train\.ddp_comm_hook'.*got 'int8'"):
        launch.ddp_kwargs(comm_hook="int8")


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_every_recipe_has_the_comm_hook_key_and_validation_names_it(kind: str,
                                                                   tmp_path: Path) -> None:
    name, data, schema, check = {
        "pretrain": ("in_domain", "data.train_files=[x.txt]", recipes.PretrainSchema,
                     validate.validate_pretrain),
        "finetune": ("fit", "data.train_file=x.jsonl", recipes.FinetuneSchema,
                     validate.validate_finetune)}[kind]
    base = [f"recipe={name}", f"output_dir={tmp_path}", data]
    cfg = recipes.load(base, schema, kind=kind)
    assert cfg.train.ddp_comm_hook is None  # fp32 all-reduce unless asked
    check(recipes.load([*base, "train.ddp_comm_hook=bf16"], schema, kind=kind),
          check_files=False)
    with pytest.raises(ConfigError, match=r"'train.ddp_comm_hook': must be null .*'int8'"):
        check(recipes.load([*base, "train.ddp_comm_hook=int8"], schema, kind=kind),
              check_files=False)


def test_comm_hook_is_ignored_with_a_line_under_fsdp_and_on_one_process(monkeypatch) -> None:
    from accelerate.utils import DistributedType

    def acc(engine: DistributedType, n: int) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=engine, num_processes=n)

    assert launch.comm_hook_note(None, acc(DistributedType.FSDP, 8)) is None
    line, warn = launch.comm_hook_note("bf16", acc(DistributedType.FSDP, 8))
    assert warn and "ignored under FSDP" in line and "train.ddp_comm_hook=bf16" in line
    line, warn = launch.comm_hook_note("fp16", acc(DistributedType.NO, 1))
    assert warn and "ignored: one process" in line
    monkeypatch.setattr(launch, "bf16_all_reduce_supported", lambda: True)
    line, warn = launch.comm_hook_note("bf16", acc(DistributedType.MULTI_GPU, 8))
    assert not warn and line.startswith("DDP gradient all-reduce in bf16")
    # where torch's DDP would refuse the bf16 hook (a CPU build): one line, before any work
    monkeypatch.setattr(launch, "bf16_all_reduce_supported", lambda: False)
    with pytest.raises(SetupError, match=r"'train\.ddp_comm_hook': bf16 needs a CUDA build"):
        launch.comm_hook_note("bf16", acc(DistributedType.MULTI_CPU, 2))
    line, warn = launch.comm_hook_note("fp16", acc(DistributedType.MULTI_CPU, 2))
    assert not warn and line.startswith("DDP gradient all-reduce in fp16")


def test_bf16_hook_support_matches_torchs_own_check() -> None:
    import torch

    if torch.version.cuda is None and torch.version.hip is None:  # this CPU build
        assert launch.bf16_all_reduce_supported() is False
    else:
        assert launch.bf16_all_reduce_supported() is (torch.cuda.nccl.version() >= (2, 10))


HOOK_WORKER = '''
import json, logging, sys
from pathlib import Path
import torch
from further_pt.train import launch

logging.basicConfig(level=logging.INFO)

hook = None if sys.argv[2] == "none" else sys.argv[2]
acc = launch.make_accelerator("no", Path(sys.argv[1]) / "logs", comm_hook=hook)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
plain = [p.detach().clone() for p in model.parameters()]
ddp = acc.prepare(model)
x = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + acc.process_index))
ddp(x).pow(2).sum().backward()  # each process its own data: its own gradient
reduced = torch.cat([p.grad.flatten() for p in ddp.parameters()])
local = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
with torch.no_grad():
    for p, q in zip(local.parameters(), plain):
        p.copy_(q)
local(x).pow(2).sum().backward()
mine = torch.cat([p.grad.flatten() for p in local.parameters()])
everyone = acc.gather(reduced[None])  # every replica's reduced gradient
locals_ = acc.gather(mine[None])      # every process's own gradient
if acc.is_main_process:
    fp32_mean = locals_.mean(0)
    half_sum = (locals_[0].half() / 2 + locals_[1].half() / 2).float()
    Path(sys.argv[1], "result.json").write_text(json.dumps({
        "hook": ddp._get_ddp_logging_data().get("comm_hook"),
        "replicas_differ_by": (everyone[0] - everyone[1]).abs().max().item(),
        "off_fp32_mean_by": (everyone[0] - fp32_mean).abs().max().item(),
        "off_half_sum_by": (everyone[0] - half_sum).abs().max().item(),
        "scale": fp32_mean.abs().max().item()}))
acc.wait_for_everyone()
acc.end_training()  # destroys the process group: exiting with gloo's threads alive can abort
'''


def _launch_two(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), *args]
    import os

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_fp16_comm_hook_compresses_the_all_reduce_and_replicas_agree(tmp_path: Path) -> None:
    """Two gloo processes with different data: with train.ddp_comm_hook=fp16 DDP reduces
    through torch's fp16_compress_hook (its name in DDP's logging data), both replicas hold
    the same gradient, and it is the fp16 sum of the halves, not the fp32 mean. (bf16 is the
    same hook with another dtype; torch registers it on CUDA builds only.)"""
    script = tmp_path / "worker.py"
    script.write_text(HOOK_WORKER)
    results = {}
    for hook in ("fp16", "none"):
        out = tmp_path / hook
        out.mkdir()
        proc = _launch_two(script, str(out), hook)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[hook] = json.loads((out / "result.json").read_text())
        if hook == "fp16":
            assert "DDP gradient all-reduce in fp16 (train.ddp_comm_hook)" in proc.stderr
    fp16, fp32 = results["fp16"], results["none"]
    assert fp16["hook"] == "fp16_compress_hook" and fp32["hook"] in (None, "", "builtin_allreduce")
    assert fp16["replicas_differ_by"] == 0.0 and fp32["replicas_differ_by"] == 0.0
    assert fp16["off_half_sum_by"] == 0.0  # exactly what the compressed all-reduce gives
    assert 0.0 < fp16["off_fp32_mean_by"] <= 2 ** -10 * fp16["scale"]  # fp16 rounding, no more
    assert fp32["off_fp32_mean_by"] <= 1e-6 * fp32["scale"]


# ---------------------------------------------------------------- fine-tuning data, file lock


def test_finetuning_tokenizes_under_the_file_lock_not_in_a_barrier(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Classification.build reads and tokenizes its tasks holding the preparation file lock in
    data.cache_dir (which has no timeout), never in accelerate's main_process_first (a barrier
    bounded by train.collective_timeout_s): here main_process_first raises, and the lock is
    seen held while the labelled file is read."""
    import filelock
    import torch
    from helpers import write_task

    from further_pt.data import labelled
    from further_pt.objectives.classification import Classification

    train = write_task(tmp_path / "train.jsonl", 24, 0)
    cache = tmp_path / "cache"
    cfg = recipes.load(["recipe=fit", f"output_dir={tmp_path / 'out'}",
                        f"model.name_or_path={tiny_model_dir}", f"data.train_file={train}",
                        "data.max_seq_length=32", f"data.cache_dir={cache}"],
                       recipes.FinetuneSchema, kind="finetune",
                       validate=validate.validate_finetune)

    def barrier() -> None:
        raise AssertionError("main_process_first: a collective with a timeout")

    held = []
    real = labelled.load_labelled

    def spy(*args, **kwargs):
        probe = filelock.FileLock(str(cache / ".further_pt-prepare.lock"))
        try:
            probe.acquire(timeout=0)
            probe.release()
            held.append(False)
        except filelock.Timeout:
            held.append(True)
        return real(*args, **kwargs)

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), main_process_first=barrier),
        resume_from=None, claim=lambda: None)
    monkeypatch.setattr(labelled, "load_labelled", spy)  # what load_tasks reads files with
    objective = Classification(cfg, None)
    objective.build(trainer)  # type: ignore[arg-type]
    assert held == [True]  # read (and then tokenized) while holding the lock
    assert len(objective.tasks[0].train) == 24


# ---------------------------------------------------------------- FSDP: state on rank 0's GPU


def test_fsdp_full_copy_stays_in_cpu_memory_and_visits_the_gpu_to_evaluate(tmp_path: Path
                                                                           ) -> None:
    """The main process's full copy of a sharded model is kept on the CPU (no whole fp32
    model on rank 0's GPU for the run); an evaluation moves it to the device and back."""
    import torch

    from further_pt.train.export import Exporter

    moves: list[str] = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):  # record where it is sent; stay put (no CUDA here)
            moves.append(str(torch.device(args[0])))
            return self

    acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=2)
    cfg = SimpleNamespace(model=SimpleNamespace(name_or_path="unused"))
    export = Exporter(acc, tmp_path, sharded=True, cfg=cfg, resolved={})
    export.keep_full_copy(Spy(4, 4), torch.device("cuda", 0))
    assert moves in ([], ["cpu"])  # never sent to the GPU to be kept
    assert {p.device.type for p in export._full.parameters()} == {"cpu"}
    moves.clear()
    seen: list[list[str]] = []
    objective = SimpleNamespace(evaluate=lambda whole, shard: seen.append(list(moves)) or {})
    export.evaluate(objective, export._full, None, {}, 1, 1)  # type: ignore[arg-type]
    assert seen == [["cuda:0"]] and moves == ["cuda:0", "cpu"]  # there for the evaluation only


def test_sharded_checkpoint_optimizer_state_is_read_by_the_main_process_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP a process other than rank 0 does not open optimizer.pt (the whole AdamW
    state, 2x the fp32 model): it gets {} and receives its shard by broadcast."""
    import torch

    from further_pt.train import checkpoint

    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def write_model(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    opened: list[tuple[bool, int, str]] = []
    real = torch.load
    where: dict[str, object] = {}
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (opened.append(
        (where["sharded"], where["rank"], Path(f).name)), real(f, *a, **k))[1])
    for sharded in (True, False):
        folder = checkpoint.save_checkpoint(
            tmp_path / str(sharded), 3, write_model=write_model,
            optimizer_state=opt.state_dict(), scheduler=sched,
            state={"sharded": sharded}, keep_last=1)
        for rank in (1, 0):
            where.update(sharded=sharded, rank=rank)
            monkeypatch.setattr(checkpoint, "_rank", lambda rank=rank: rank)
            state, optimizer_state = checkpoint.load_training_state(folder, sched)
            assert state["sharded"] is sharded and state["step"] == 3
            assert bool(optimizer_state) is (rank == 0 or not sharded)
    assert [x for x in opened if x[2] == "optimizer.pt"] == [
        (True, 0, "optimizer.pt"), (False, 1, "optimizer.pt"), (False, 0, "optimizer.pt")]
