"""`further-pt doctor` on a CPU: runs what applies, lists what it skipped, one summary line."""

from __future__ import annotations

import pytest

from further_pt.cli import doctor
from further_pt.cli.doctor import Check


@pytest.mark.slow
def test_doctor_on_this_cpu_runs_what_applies(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(doctor.CPU_SIZE, "steps", 12)
    monkeypatch.setitem(doctor.CPU_SIZE, "batch", 8)
    lines: list[str] = []
    checks = doctor.diagnose(tmp_path, emit=lines.append)
    status = {c.name: c.status for c in checks}
    assert [c.status for c in checks if c.status == "FAIL"] == [], lines
    assert status["versions"] == status["devices"] == status["model"] == "ok"
    assert status["NCCL all-reduce"] == "skip" and status["fp16 survives an overflow"] == "skip"
    assert status["kill and resume"] == "ok"
    assert status["in_domain recipe's run, projected"] == "ok"
    throughput = next(c for c in checks if c.name.startswith("MLM pretraining"))
    assert throughput.status == "ok" and " tokens/s, MFU " in throughput.detail
    line = doctor.summary(checks)
    assert line.startswith("further-pt doctor: OK | CPU ") and "tokens/s" in line
    assert "skipped: NCCL all-reduce, fp16 survives an overflow" in line
    assert len(lines) == len(checks) and all(x.startswith("[") for x in lines)


def test_summary_names_failures_and_skips() -> None:
    checks = [Check("versions", "ok", "torch 2.13.0"), Check("devices", "ok", "no CUDA GPU"),
              Check("MLM pretraining, bf16", "ok", "2 x 128 BERT: 1,234 tokens/s, MFU 12.0%"),
              Check("kill and resume", "FAIL", "did not resume"),
              Check("NCCL all-reduce", "skip", "needs 2 or more GPUs (0 here)")]
    line = doctor.summary(checks)
    assert line.startswith("further-pt doctor: FAILED (kill and resume) | CPU ")
    assert "| 1,234 tokens/s, MFU 12.0% |" in line
    assert "3 passed, 1 failed, 1 skipped: NCCL all-reduce |" in line
    assert Check("x", "skip", "why", 2.4).line() == "[skip] x: why (2 s)"


def test_versions_flag_a_package_below_the_declared_floor(monkeypatch) -> None:
    real = doctor.metadata.version
    monkeypatch.setattr(doctor.metadata, "version",
                        lambda name: "2.0.0" if name == "torch" else real(name))
    check = doctor.versions()
    assert check.status == "FAIL" and "torch 2.0.0 does not meet >=" in check.detail


def test_projection_of_the_papers_run_from_a_measured_throughput() -> None:
    """doctor turns its tokens/s into the wall time of a corpus recipe's 100K steps of
    BERT-base at the recipe's global batch: 100,000 x 32 x 128 tokens / tokens/s."""
    from further_pt.cli import projection

    assert projection.recipe_run("in_domain") == (100_000, 32, 128)
    # a GPU: doctor measured BERT-base itself, 20,000 tokens/s on one GPU
    measured = Check("MLM pretraining, bf16", "ok", "...", tokens_per_s=20_000.0)
    check = doctor.projection(measured, doctor.GPU_SIZE, 8)
    seconds = 100_000 * 32 * 128 / 20_000  # 20,480 s = 5.7 h
    assert check.status == "ok" and check.name == "in_domain recipe's run, projected"
    assert check.detail.startswith("100,000 steps x 32 x 128 tokens = 409.6M tokens of "
                                   "BERT-base at 20,000 tokens/s: 5.7 h on one GPU")
    assert f"; 8 GPUs, ideal scaling: {seconds / 8 / 3600:.1f} h" in check.detail
    # a CPU: the demo-size model's tokens/s, scaled to BERT-base by FLOPs per token
    small = Check("MLM pretraining, bf16", "ok", "...", tokens_per_s=50_000.0)
    ratio = (projection.flops_per_token(doctor.CPU_SIZE, 128)
             / projection.flops_per_token(doctor.GPU_SIZE, 128))
    assert 0.005 < ratio < 0.01  # BERT-base does ~150x the work per token of 2 x 128
    cpu = doctor.projection(small, doctor.CPU_SIZE).detail
    assert f"at {50_000 * ratio:,.0f} tokens/s, by FLOPs per token from the 2 x 128" in cpu
    hours = 409.6e6 / (50_000 * ratio) / 3600  # days, past 48 h
    assert f": {hours:,.1f} h ({hours / 24:,.1f} days) on one CPU" in cpu
    failed = doctor.projection(Check("MLM pretraining, bf16", "FAIL", "exit 1"), doctor.GPU_SIZE)
    assert failed.status == "skip"
