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
