"""GPUs the NVIDIA driver shows but torch cannot use: why, and the fix, in one line.

A torch built for CUDA 13 needs an NVIDIA driver >= 580; most cloud H100/A100 hosts run
R535-R570. There ``torch.cuda.is_available()`` is simply False (torch only warns), so
an 8-GPU job would die on a mismatch of process counts and ``further-pt doctor`` would
report a CPU machine. :func:`unusable_gpus` asks ``nvidia-smi`` (which ships with the
driver) whether there are GPUs at all and, when there are, names the driver, this torch's
CUDA and what fixes it: the image's other build argument, another torch build, or a
newer driver. The launcher (:func:`further_pt.train.launch.make_accelerator`) and the
doctor print that line.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch

__all__ = ["IMAGE_CUDA", "MIN_DRIVER", "gpu_problem", "nvidia_smi", "unusable_gpus"]

#: The oldest driver (major version) each CUDA major runs on through CUDA's minor-version
#: compatibility: any 12.x build on R525 and newer, any 13.x build on R580 and newer.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
#: The default CUDA of ``docker/Dockerfile`` (its ``ARG CUDA``; tests/test_docker.py keeps
#: the two equal): the torch build for drivers older than CUDA 13 needs.
IMAGE_CUDA = "12.6"


def nvidia_smi(*args: str, timeout: float = 10.0) -> str | None:
    """``nvidia-smi ARGS``'s output; None without nvidia-smi, or when it fails or hangs
    (it fails when no driver is loaded)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpu_problem(gpus: int, driver: str, torch_version: str, torch_cuda: str | None,
                visible: str | None = None) -> str:
    """The one line for ``gpus`` GPUs on ``driver`` that torch ``torch_version`` (built for
    CUDA ``torch_cuda``, None: a CPU build) cannot use. ``visible``: CUDA_VISIBLE_DEVICES."""
    seen = (f"nvidia-smi lists {gpus} GPU(s) (driver {driver}) but torch {torch_version} "
            "sees none")
    older = f"docker build --build-arg CUDA={IMAGE_CUDA} -f docker/Dockerfile ."
    if torch_cuda is None:
        return (f"{seen}: it is a CPU build; install a CUDA build of torch (CUDA {IMAGE_CUDA} "
                f"for drivers >= {MIN_DRIVER[12]}, or use the image: {older})")
    major = driver.split(".")[0]
    driver_major = int(major) if major.isdigit() else None
    need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
    if need is not None and driver_major is not None and driver_major < need:
        if driver_major >= MIN_DRIVER[12]:
            fix = (f"rebuild the image for CUDA {IMAGE_CUDA} ({older}) or, outside Docker, "
                   f"install torch's CUDA {IMAGE_CUDA} build; or upgrade the driver to >= {need}")
        elif need <= MIN_DRIVER[12]:
            fix = f"upgrade the driver to >= {need}"
        else:
            fix = (f"upgrade the driver to >= {need}, or to >= {MIN_DRIVER[12]} and "
                   f"{older}")
        return (f"{seen}: the driver is older than its CUDA {torch_cuda} needs (>= {need}); "
                f"fix: {fix}")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"{seen} (CUDA {torch_cuda}, which this driver runs{hidden}): check "
            "CUDA_VISIBLE_DEVICES and what `python -c 'import torch; torch.cuda.init()'` says")


def unusable_gpus() -> str | None:
    """The one line of :func:`gpu_problem` when ``nvidia-smi -L`` lists GPUs while torch
    sees none; None when torch has a GPU, or nvidia-smi is absent, fails or lists none.

    Costs nothing on a machine with a working GPU (torch answers first) or without a
    driver (no nvidia-smi on PATH); elsewhere two short nvidia-smi calls.
    """
    if torch.cuda.is_available():
        return None
    listed = nvidia_smi("-L") or ""
    gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
    if not gpus:
        return None
    versions = (nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader") or "").split()
    return gpu_problem(len(gpus), versions[0] if versions else "unknown", torch.__version__,
                       torch.version.cuda, os.environ.get("CUDA_VISIBLE_DEVICES"))
