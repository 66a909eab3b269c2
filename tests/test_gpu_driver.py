"""GPUs the driver shows and torch cannot use: one line naming the driver and the fix
(issue 27, item 1), from the launcher and from `further-pt doctor`.

A fake ``nvidia-smi`` on PATH plays the driver; torch is this machine's CPU build, or
says it was built for a CUDA (``torch.version.cuda``) while seeing no GPU, as torch does
on a driver older than its CUDA needs.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from further_pt.cli import doctor
from further_pt.errors import SetupError
from further_pt.train import gpu_driver, launch

H100 = "NVIDIA H100 80GB HBM3"


def fake_nvidia_smi(bin_dir: Path, gpus: int, driver: str = "550.54.15",
                    fails: bool = False) -> None:
    """An ``nvidia-smi`` that lists ``gpus`` H100s and their driver (or fails, as it does
    when no driver is loaded)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    if fails:
        body = 'echo "NVIDIA-SMI has failed because it could not communicate" >&2\nexit 9\n'
    else:
        listed = "".join(f"GPU {i}: {H100} (UUID: GPU-{i})\\n" for i in range(gpus))
        versions = f"{driver}\\n" * gpus
        body = (f'case "$1" in\n  -L) printf "{listed}" ;;\n'
                f'  --query-gpu=driver_version) printf "{versions}" ;;\n  *) exit 2 ;;\nesac\n')
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """Put a fake nvidia-smi first on PATH: ``driver(gpus, version)``; torch sees no GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def install(gpus: int = 8, version: str = "550.54.15", *, fails: bool = False,
                cuda: str | None = "13.0") -> None:
        fake_nvidia_smi(tmp_path / "bin", gpus, version, fails)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
        monkeypatch.setattr(torch.version, "cuda", cuda)

    return install


DRIVER_TOO_OLD = (
    f"nvidia-smi lists 8 GPU(s) (driver 550.54.15) but torch {torch.__version__} sees none: "
    "the driver is older than its CUDA 13.0 needs (>= 580); fix: rebuild the image for CUDA "
    "12.6 (docker build --build-arg CUDA=12.6 -f docker/Dockerfile .) or, outside Docker, "
    "install torch's CUDA 12.6 build; or upgrade the driver to >= 580")


def test_a_driver_older_than_torchs_cuda_is_named_with_the_fix(driver) -> None:
    driver(8, "550.54.15", cuda="13.0")
    assert gpu_driver.unusable_gpus() == DRIVER_TOO_OLD
    driver(2, "470.256.02", cuda="12.6")  # older than any CUDA 12 needs: only a new driver
    line = gpu_driver.unusable_gpus()
    assert line.startswith("nvidia-smi lists 2 GPU(s) (driver 470.256.02) but torch ")
    assert line.endswith("the driver is older than its CUDA 12.6 needs (>= 525); fix: upgrade "
                         "the driver to >= 525")
    driver(2, "470.256.02", cuda="13.0")
    assert gpu_driver.unusable_gpus().endswith(
        "(>= 580); fix: upgrade the driver to >= 580, or to >= 525 and docker build "
        "--build-arg CUDA=12.6 -f docker/Dockerfile .")
    driver(1, "550.54.15", cuda=None)  # a CPU build of torch on a GPU machine
    assert "sees none: it is a CPU build; install a CUDA build of torch (CUDA 12.6 for " \
           "drivers >= 525" in gpu_driver.unusable_gpus()
    driver(4, "580.65.06", cuda="13.0")  # the driver is new enough: say what else to check
    assert "(CUDA 13.0, which this driver runs): check CUDA_VISIBLE_DEVICES" in (
        gpu_driver.unusable_gpus())


def test_no_line_without_listed_gpus_or_when_torch_has_them(driver, monkeypatch, tmp_path
                                                            ) -> None:
    driver(0)
    assert gpu_driver.unusable_gpus() is None  # nvidia-smi runs, lists no GPU
    driver(8, fails=True)
    assert gpu_driver.unusable_gpus() is None  # no driver loaded
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_driver.unusable_gpus() is None  # no nvidia-smi at all
    driver(8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_driver.unusable_gpus() is None  # torch uses the GPUs: nothing is asked


def test_the_image_default_cuda_runs_on_the_drivers_clouds_run() -> None:
    """R535 (the oldest driver the issue names) runs the image's default CUDA 12.x."""
    assert gpu_driver.MIN_DRIVER[int(gpu_driver.IMAGE_CUDA.split(".")[0])] <= 535


def test_the_launcher_says_the_driver_line_not_the_process_count(driver, monkeypatch,
                                                                 tmp_path) -> None:
    """WORLD_SIZE=8 on GPUs torch cannot use: the driver's line, before any Accelerator
    (whose process count, 1, would only say that the numbers disagree)."""
    driver(8, "550.54.15", cuda="13.0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SetupError) as caught:
        launch.make_accelerator("no", tmp_path / "logs")
    assert str(caught.value) == DRIVER_TOO_OLD


def test_one_process_on_gpus_torch_cannot_use_warns_and_trains_on_the_cpu(
        driver, monkeypatch, tmp_path, caplog) -> None:
    from accelerate.state import AcceleratorState

    driver(1, "550.54.15", cuda="13.0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    try:
        with caplog.at_level("WARNING", logger="further_pt.train.launch"):
            accelerator = launch.make_accelerator("no", tmp_path / "logs")
        assert accelerator.device.type == "cpu"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [DRIVER_TOO_OLD.replace("8 GPU(s)", "1 GPU(s)")
                      + "; this run trains on the CPU"]


def test_doctor_devices_fails_with_the_driver_line(driver) -> None:
    driver(8, "550.54.15", cuda="13.0")
    check = doctor.devices()
    assert (check.status, check.detail) == ("FAIL", DRIVER_TOO_OLD)
    driver(0)
    assert doctor.devices().status == "ok"  # no GPU listed: a CPU machine, as before
