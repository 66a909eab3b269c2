"""Hardware: the precision, thread count and FLOP/s figures a run derives from its machine.

Pure functions (detection is passed in) so every branch is testable on any box:

- :func:`choose_precision` turns ``train.mixed_precision`` (``auto`` included) and
  what ``accelerate launch`` asked for into the value for
  ``accelerate.Accelerator(mixed_precision=...)``;
- :func:`configure_cpu_threads` gives a CPU run all the cores it may use, because
  ``accelerate launch`` without ``--num_cpu_threads_per_process`` pins a process to
  one thread (see :func:`user_chose_threads`);
- :func:`matmul_peak_flops` and :func:`encoder_flops_per_token` are the denominator
  and numerator of MFU (model FLOPs utilisation).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping

import torch

from further_pt.errors import ConfigError

__all__ = ["BF16_CPU_FLAGS", "DATASHEET_PEAKS", "choose_precision", "configure_cpu_threads",
           "configure_tf32", "cpu_bf16_flags", "cpu_threads", "datasheet_peak", "detect_precision",
           "local_cuda_capability", "matmul_peak_flops", "peak_flops",
           "si", "user_chose_threads"]

#: x86 CPU flags that make bf16 matmuls fast (oneDNN uses them); without them bf16 on a CPU
#: is emulated and slower than fp32, so ``auto`` keeps fp32 there.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PRECISIONS = ("no", "fp16", "bf16")
_LAUNCHER_CHOICES = ("fp16", "bf16", "fp8")


# --------------------------------------------------------------------------- precision


def cpu_bf16_flags(cpuinfo_text: str | None = None) -> set[str]:
    """Which of :data:`BF16_CPU_FLAGS` the CPU reports in ``/proc/cpuinfo``'s ``flags`` lines.

    Reads ``/proc/cpuinfo`` when ``cpuinfo_text`` is None; where that file does not
    exist (macOS, Windows) the answer is the empty set, i.e. "no fast bf16".
    """
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo_text = fh.read()
        except OSError:
            return set()
    found: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            found.update(set(value.split()) & set(BF16_CPU_FLAGS))
    return found


def choose_precision(
    requested: str | None, *, device_type: str, cuda_capability: tuple[int, int] | None,
    cpu_flags: set[str], launcher: str | None,
) -> tuple[str | None, str]:
    """The ``mixed_precision`` for ``accelerate.Accelerator`` and a one-line reason for the log.

    ``requested`` is ``train.mixed_precision``:

    - ``"no"``/``"fp16"``/``"bf16"``: used as is. An explicit recipe value also beats
      ``accelerate launch --mixed_precision`` (``Accelerator``'s argument wins over the
      environment), and the reason says so when they differ.
    - ``None``: returns None, so accelerate uses ``ACCELERATE_MIXED_PRECISION`` (set by
      ``accelerate launch`` from its flag or config file), else ``"no"``.
    - ``"auto"``: ``"bf16"`` on a CUDA GPU of compute capability 8.0 or newer (Ampere,
      Hopper, Blackwell: native bf16 tensor cores) and on a CPU with AMX-BF16 or
      AVX512-BF16; ``"fp16"`` on a CUDA GPU of capability 7.x (V100, T4: fp16 tensor cores,
      bf16 only emulated, several times slower), trained under a GradScaler that skips
      overflowing steps; ``"no"`` elsewhere. The capability is the local device's, so
      ``torch.cuda.is_bf16_supported()`` - which counts emulated bf16 as support and
      touches cuda:0 from every process - is never asked.

    ``launcher`` is the ``ACCELERATE_MIXED_PRECISION`` environment value. Every
    ``accelerate launch`` sets it, to ``"no"`` when neither ``--mixed_precision`` nor a
    config file gave a value (``commands/launch.py`` fills in ``"no"``;
    ``utils/launch.py`` exports it), so ``"no"`` cannot be told apart from "nothing
    asked". The rule is therefore: under ``auto``, a launcher value of ``fp16``,
    ``bf16`` or ``fp8`` wins (somebody asked for it); ``"no"`` or unset lets ``auto``
    decide. To force fp32 on a bf16-capable machine, set ``train.mixed_precision: no``.

    ``device_type`` is ``"cuda"``, ``"cpu"`` or another torch device type (``auto``
    picks ``"no"`` for those). Raises ConfigError for an unknown ``requested`` value.
    """
    launched = (launcher or "").strip().lower() or None
    if requested is not None and requested not in (*PRECISIONS, "auto"):
        raise ConfigError(f"train.mixed_precision: {requested!r} is not one of "
                          f"no, fp16, bf16, auto or null")
    if requested in PRECISIONS:
        note = (f"; overrides accelerate launch's {launched}"
                if launched not in (None, "no", requested) else "")
        return requested, f"train.mixed_precision={requested} (set in the recipe{note})"
    if requested is None:
        return None, (f"train.mixed_precision=null: accelerate's setting "
                      f"({launched or 'no'}, from ACCELERATE_MIXED_PRECISION)")
    if launched in _LAUNCHER_CHOICES:
        return launched, (f"auto: accelerate launch asked for {launched} "
                          "(ACCELERATE_MIXED_PRECISION), which wins over auto")
    if device_type == "cuda":
        major, minor = cuda_capability or (0, 0)
        cc = f"compute capability {major}.{minor}"
        if major >= 8:
            return "bf16", f"auto: bf16, the CUDA GPU has native bfloat16 ({cc})"
        if major == 7:
            return "fp16", (f"auto: fp16 with loss scaling, the CUDA GPU has fp16 tensor cores "
                            f"but only emulated bfloat16 ({cc})")
        return "no", f"auto: fp32, the CUDA GPU has no fast half precision ({cc})"
    if device_type == "cpu":
        fast = sorted(cpu_flags & set(BF16_CPU_FLAGS))
        if fast:
            return "bf16", f"auto: bf16, the CPU has {'/'.join(fast)}"
        return "no", "auto: fp32, the CPU has neither amx_bf16 nor avx512_bf16"
    return "no", f"auto: fp32 on device type {device_type!r} (set bf16/fp16 explicitly)"


def detect_precision(requested: str | None, *, cpu: bool = False) -> tuple[str | None, str]:
    """:func:`choose_precision` with this machine's detection filled in.

    ``cpu`` is the run's "force CPU" setting; ``ACCELERATE_USE_CPU`` (from
    ``accelerate launch --cpu``) forces it too. Call before creating the Accelerator.
    """
    use_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    on_cuda = not use_cpu and torch.cuda.is_available()
    return choose_precision(
        requested, device_type="cuda" if on_cuda else "cpu",
        cuda_capability=local_cuda_capability() if on_cuda else None,
        cpu_flags=set() if on_cuda else cpu_bf16_flags(),
        launcher=os.environ.get("ACCELERATE_MIXED_PRECISION"))


def local_cuda_capability() -> tuple[int, int]:
    """Compute capability of this process's GPU (``LOCAL_RANK``), without a context on cuda:0.

    ``get_device_capability(i)`` reads the device's properties; unlike a test tensor it
    creates no CUDA context, so eight processes do not each put ~500 MB on GPU 0 before
    Accelerate has set their devices.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return tuple(torch.cuda.get_device_capability(local % max(torch.cuda.device_count(), 1)))


def configure_tf32(enabled: bool, capability: tuple[int, int] | None) -> str | None:
    """TF32 for fp32 matmuls and cuDNN convolutions on Ampere and newer; the log note or None.

    An fp32 matmul on an A100/H100 otherwise runs on the (8-16x slower) non-tensor-core
    path; TF32 keeps fp32 range with a 10-bit mantissa, which BERT training tolerates (the
    default of PyTorch before 1.12). Only for CUDA devices of capability >= 8.0; ``enabled``
    is ``train.tf32`` (false: exact fp32, e.g. for a parity check).
    """
    if capability is None or capability[0] < 8:
        return None
    # Through the legacy API, which both APIs then read back consistently. Setting the new
    # ``fp32_precision`` API instead makes every later read of the legacy one
    # (``torch.backends.cuda.matmul.allow_tf32``, ``torch.get_float32_matmul_precision()``)
    # raise "mix of the legacy and new APIs" in torch >= 2.9; inductor's max-autotune, flex
    # attention and accelerate (which sets ``allow_tf32`` under a dynamo backend) read or
    # write the legacy one.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return (f"TF32 for fp32 matmuls and convolutions: {'on' if enabled else 'off'} "
            f"(train.tf32={str(enabled).lower()})")


# --------------------------------------------------------------------------- threads


def cpu_threads(local_processes: int, affinity: set[int] | None = None) -> int:
    """Cores one process may use: the CPUs it may run on, split among this machine's processes.

    ``affinity`` defaults to ``os.sched_getaffinity(0)`` (which honours taskset, cgroups
    cpusets and container CPU pinning, unlike ``os.cpu_count()``, the fallback where
    it does not exist). At least 1.
    """
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    return max(1, len(affinity) // max(1, local_processes))


def user_chose_threads(env: Mapping[str, str]) -> bool:
    """Whether ``OMP_NUM_THREADS`` in ``env`` is the user's choice rather than a launcher's fill-in.

    ``accelerate launch`` always exports ``OMP_NUM_THREADS``: without
    ``--num_cpu_threads_per_process`` it uses the inherited ``OMP_NUM_THREADS`` or **1**,
    raising it to physical cores / local processes only with ``--cpu`` (and then only
    when that is > 1, so a 2-vCPU VM with one physical core stays at 1). ``torchrun``
    likewise sets 1 for more than one process per node. So ``"1"`` in a process started
    by a launcher (``ACCELERATE_MIXED_PRECISION`` or ``TORCHELASTIC_RUN_ID`` set) is taken
    as a default, not a choice; any other value, or ``"1"`` without a launcher, is the
    user's. (A user who really wants one thread under a launcher says so another way,
    e.g. the ``requested`` argument of :func:`configure_cpu_threads`.)
    """
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return False
    launched = "ACCELERATE_MIXED_PRECISION" in env or "TORCHELASTIC_RUN_ID" in env
    return not (launched and value == "1")


def configure_cpu_threads(local_processes: int, requested: int | None = None,
                          env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """CPU runs: set ``torch.set_num_threads`` to this process's share of cores; return (n, reason).

    ``requested`` (a recipe value, if the lead adds one) wins; then an ``OMP_NUM_THREADS``
    the user chose (see :func:`user_chose_threads`) is kept; otherwise
    :func:`cpu_threads` cores. Call once, early, on every process of a CPU run.
    """
    env = os.environ if env is None else env
    if requested is not None:
        n, why = max(1, int(requested)), "set in the recipe"
    elif user_chose_threads(env):
        return torch.get_num_threads(), (f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} kept (the "
                                         "user's, or accelerate launch --cpu's core split)")
    else:
        n = cpu_threads(local_processes)
        why = f"the cores this process may use, split among {max(1, local_processes)} process(es)"
        if env.get("OMP_NUM_THREADS"):
            why += f"; OMP_NUM_THREADS={env['OMP_NUM_THREADS']} was the launcher's default"
    torch.set_num_threads(n)
    return n, why


# --------------------------------------------------------------------------- FLOPs


def matmul_peak_flops(dtype: torch.dtype, device: str = "cpu", n: int = 1024,
                      seconds: float = 1.0) -> float:
    """Measured dense-matmul FLOP/s of ``n x n`` matrices in ``dtype``: the MFU denominator.

    Measured rather than taken from a datasheet because on CPUs the peak depends on the
    ISA and dtype (bf16 with AMX can be ~6x fp32) and on the thread count already set
    (:func:`configure_cpu_threads` first). Best of as many repeats as fit in ``seconds``
    (at least 3), after one warm-up.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    with torch.no_grad():
        torch.mm(a, b)
        sync()
        best, spent, runs = math.inf, 0.0, 0
        while runs < 3 or spent < seconds:
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            took = time.perf_counter() - start
            best, spent, runs = min(best, took), spent + took, runs + 1
    return 2 * n**3 / max(best, 1e-9)


#: Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s per GPU, by dtype
#: ("tf32" is an fp32 matmul under TF32). Matched in order against
#: ``torch.cuda.get_device_name()``; the first pattern that matches wins, so the more
#: specific form factors come first. Dtypes a device lacks (V100/T4 bf16) are absent.
DATASHEET_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12,
                                  "fp32": 51.2e12}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
                                "fp32": 60e12}),
    (r"H100", "H100 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12,
                           "fp32": 66.9e12}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
                                "fp32": 60e12}),
    (r"H200", "H200 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12,
                           "fp32": 66.9e12}),
    (r"B200", "B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12}),
    (r"A100", "A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", "L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL4\b", "L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", "A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"V100.*PCIE", "V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    (r"V100", "V100 SXM2", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bT4\b", "T4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def _dtype_key(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def datasheet_peak(device_name: str, dtype: torch.dtype, *, tf32: bool = False
                   ) -> tuple[float, str] | None:
    """``(FLOP/s, "H100 SXM datasheet")`` for a known GPU and dtype, else None."""
    key = _dtype_key(dtype, tf32)
    for pattern, label, peaks in DATASHEET_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return (peaks[key], f"{label} datasheet, dense {key}") if key in peaks else None
    return None


def cuda_matmul_peak(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Sustained matmul FLOP/s of this GPU: ``repeats`` back-to-back ``n^3`` products.

    Timed with CUDA events around the whole series, not a sync per product: a sync
    after each small matmul measures kernel launches, which on an H100 reads several
    times below the tensor cores' rate (and would put the logged MFU above 100%).
    """
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    best = math.inf
    with torch.no_grad():
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.mm(a, b)
            start.record()
            for _ in range(repeats):
                torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 * repeats / best


def peak_flops(dtype: torch.dtype, device: torch.device | str, *, tf32: bool = False,
               device_name: str | None = None) -> tuple[float, str]:
    """The MFU denominator for one process: ``(FLOP/s, where it came from)``.

    A CUDA GPU named in :data:`DATASHEET_PEAKS` gets its datasheet's dense peak (what
    MFU is conventionally reported against); another CUDA GPU gets a sustained
    measurement (:func:`cuda_matmul_peak`); a CPU gets :func:`matmul_peak_flops`, since
    its peak depends on the ISA, dtype and the threads this process runs.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        name = device_name if device_name is not None else torch.cuda.get_device_name(dev)
        known = datasheet_peak(name, dtype, tf32=tf32)
        if known is not None:
            return known
        return cuda_matmul_peak(dtype), f"{name}: measured, 20 back-to-back 8192^3 matmuls"
    dtype_name = str(dtype).removeprefix("torch.")
    return (matmul_peak_flops(dtype, dev.type, seconds=0.3),
            f"measured {dtype_name} matmul peak of this CPU process")


def si(value: float, unit: str = "FLOP/s") -> str:
    """``989e12 -> "989 TFLOP/s"``, ``1.2e5 -> "120 kFLOP"``: three significant digits."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


