"""Checkpoints are atomic, verified, pruned; an output dir never hides another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from further_pt.config.recipes import ConfigError
from further_pt.data.order import ResumableSampler
from further_pt.errors import SetupError
from further_pt.train import checkpoint, output_dir


def _save(root: Path, step: int, keep_last: int = 3) -> Path:
    param = torch.nn.Parameter(torch.ones(3) * step)
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    def write_model(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"w" * (100 + step))
        (folder / "config.json").write_text("{}")

    return checkpoint.save_checkpoint(root, step, write_model=write_model,
                                      optimizer_state=opt.state_dict(),
                                      scheduler=sched, state={"epoch": 1, "position": step},
                                      keep_last=keep_last)


def test_save_load_prune(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _save(root, step)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == [
        "step-000020", "step-000030", "step-000040"]
    newest = checkpoint.latest_checkpoint(root)
    assert newest is not None and newest.name == "step-000040"
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    state, optimizer_state = checkpoint.load_training_state(newest, sched)
    opt.load_state_dict(optimizer_state)
    assert state == {"epoch": 1, "position": 40, "step": 40}
    assert opt.state_dict()["state"][0]["step"].item() == 1


def test_partial_and_corrupt_checkpoints_fall_back(tmp_path: Path, caplog) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 10)
    good = _save(root, 20)
    corrupt = _save(root, 30)
    (root / ".tmp-step-000040").mkdir()  # a write killed half-way
    (root / ".tmp-step-000040" / "model.safetensors").write_bytes(b"partial")
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[5] ^= 0xFF  # same size, flipped bits
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint.latest_checkpoint(root) == good
    assert "skipping checkpoint" in caplog.text and "step-000030" in caplog.text
    assert "does not match its checksum" in caplog.text
    assert (root / ".tmp-step-000040").exists()  # discovery is read-only...
    checkpoint.remove_partial(root)
    assert not (root / ".tmp-step-000040").exists()  # ...cleaning is the main process's job
    (good / "optimizer.pt").write_bytes(b"")  # truncated
    newest = checkpoint.latest_checkpoint(root)
    assert newest is not None and newest.name == "step-000010"


def test_output_dir_guard(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = {"train": {"lr": 1e-4, "max_steps": 10}, "seed": 1}
    assert output_dir.prepare_output_dir(out, cfg, overwrite=False) is False
    output_dir.write_config(out, cfg, overwrite=False)
    assert output_dir.prepare_output_dir(out, cfg, overwrite=False) is True
    longer = {"train": {"lr": 1e-4, "max_steps": 20}, "seed": 1}
    assert output_dir.prepare_output_dir(out, longer, overwrite=False,
                                         may_differ=["train.max_steps"]) is True
    other = {"train": {"lr": 5e-5, "max_steps": 10}, "seed": 1}
    with pytest.raises(ConfigError,
                       match=r"different config \(train.lr: 0.0001 there, 5e-05 now\)"):
        output_dir.prepare_output_dir(out, other, overwrite=False)
    assert output_dir.prepare_output_dir(out, other, overwrite=True) is False
    # A key added to further_pt after the run started: the run resumes after the upgrade,
    # and the Trainer can tell that the run never had it (it then keeps the old behaviour).
    upgraded = {"train": {"lr": 1e-4, "max_steps": 10, "global_batch_size": 32}, "seed": 1}
    assert output_dir.prepare_output_dir(out, upgraded, overwrite=False) is True
    assert output_dir.saved_has_key(out, "train.lr")
    assert not output_dir.saved_has_key(out, "train.global_batch_size")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no further_pt run"):
        output_dir.prepare_output_dir(stranger, cfg, overwrite=False)


def test_sampler_resumes_in_place_and_splits_ranks() -> None:
    full = list(ResumableSampler(103, seed=5))
    assert sorted(full) == list(range(103))
    resumed = ResumableSampler(103, seed=5)
    resumed.set_position(0, 40)
    assert list(resumed) == full[40:]
    epoch1 = ResumableSampler(103, seed=5)
    epoch1.set_position(1, 0)
    assert list(epoch1) != full and sorted(epoch1) == list(range(103))
    ranks = [list(ResumableSampler(103, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 51
    assert not set(ranks[0]) & set(ranks[1])


def test_length_grouped_sampler_is_exact_tight_and_resumable() -> None:
    lengths = torch.randint(5, 129, (1000,), generator=torch.Generator().manual_seed(0))
    grouped = ResumableSampler(1000, seed=3, lengths=lengths, batch_size=8)
    order = list(grouped)
    assert sorted(order) == list(range(1000))  # every instance exactly once: same tokens
    batches = [order[i:i + 8] for i in range(0, 1000, 8)]
    pad_grouped = sum(8 * max(lengths[b]) - sum(lengths[b]) for b in batches)
    plain = list(ResumableSampler(1000, seed=3))
    pad_plain = sum(8 * max(lengths[plain[i:i + 8]]) - sum(lengths[plain[i:i + 8]])
                    for i in range(0, 1000, 8))
    assert pad_grouped < pad_plain / 5  # far less padding
    resumed = ResumableSampler(1000, seed=3, lengths=lengths, batch_size=8)
    resumed.set_position(0, 240)
    assert list(resumed) == order[240:]
    two = [ResumableSampler(1000, seed=3, rank=r, world_size=2, lengths=lengths, batch_size=8)
           for r in range(2)]
    assert not set(two[0]) & set(two[1]) and len(list(two[0])) == 500


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path: Path) -> None:
    folder = _save(tmp_path / "checkpoints", 10)  # written without "sharded": data parallel
    checkpoint.check_same_engine(folder, sharded=False)
    with pytest.raises(SetupError) as exc:
        checkpoint.check_same_engine(folder, sharded=True)
    assert str(exc.value) == (
        f"{folder} was written under data parallelism; this run uses FSDP: resume with the "
        "engine that wrote it (its optimizer state is laid out for that engine)")
    state = folder / checkpoint.STATE
    state.write_text(json.dumps({**json.loads(state.read_text()), "sharded": True}))
    checkpoint.check_same_engine(folder, sharded=True)
    with pytest.raises(SetupError, match="written under FSDP; this run uses data parallelism"):
        checkpoint.check_same_engine(folder, sharded=False)
