"""Hardware choices: precision table, cpuinfo flags, thread split, FLOPs formula, measured peak."""

from __future__ import annotations

import math
import time

import pytest
import torch

from further_pt.errors import ConfigError
from further_pt.objectives.encoder import encoder_flops_per_token
from further_pt.train import hardware
from further_pt.train.hardware import (
    choose_precision,
    configure_cpu_threads,
    cpu_bf16_flags,
    cpu_threads,
    matmul_peak_flops,
    user_chose_threads,
)

AMX = {"amx_bf16"}
NONE: set[str] = set()

A100, V100, P100 = (8, 0), (7, 0), (6, 0)

# (requested, device_type, cuda_capability, cpu_flags, launcher) -> expected mixed_precision
TABLE = [
    # explicit recipe values win over everything, launcher included
    ("no", "cuda", A100, NONE, "bf16", "no"),
    ("fp16", "cpu", None, AMX, None, "fp16"),
    ("bf16", "cpu", None, NONE, "fp16", "bf16"),
    ("bf16", "cuda", V100, NONE, "no", "bf16"),
    # null: accelerate's own setting (the env / its default)
    (None, "cuda", A100, AMX, "fp16", None),
    (None, "cpu", None, AMX, None, None),
    # auto: an explicit launcher precision wins
    ("auto", "cpu", None, NONE, "bf16", "bf16"),
    ("auto", "cuda", A100, NONE, "fp16", "fp16"),
    ("auto", "cuda", P100, NONE, "FP8", "fp8"),
    # auto: the launcher's default "no" (or nothing) does not stop detection
    ("auto", "cuda", A100, NONE, "no", "bf16"),
    ("auto", "cuda", (9, 0), NONE, None, "bf16"),
    ("auto", "cuda", V100, AMX, "no", "fp16"),  # V100/T4: fp16 tensor cores, bf16 emulated
    ("auto", "cuda", (7, 5), NONE, None, "fp16"),
    ("auto", "cuda", P100, AMX, "no", "no"),
    ("auto", "cpu", None, AMX, "no", "bf16"),
    ("auto", "cpu", None, {"avx512_bf16"}, None, "bf16"),
    ("auto", "cpu", None, NONE, "", "no"),
    ("auto", "cpu", A100, NONE, None, "no"),  # a GPU's capability is irrelevant on a CPU run
    ("auto", "mps", None, AMX, None, "no"),
]


@pytest.mark.parametrize(("requested", "device", "capability", "flags", "launcher", "expected"),
                         TABLE)
def test_precision_choice_table(requested, device, capability, flags, launcher, expected) -> None:
    chosen, reason = choose_precision(requested, device_type=device, cuda_capability=capability,
                                      cpu_flags=flags, launcher=launcher)
    assert chosen == expected
    assert reason and "\n" not in reason


def test_precision_reasons_name_the_cause() -> None:
    _, why = choose_precision("no", device_type="cuda", cuda_capability=A100, cpu_flags=NONE,
                              launcher="bf16")
    assert "overrides accelerate launch's bf16" in why
    _, why = choose_precision("auto", device_type="cpu", cuda_capability=None,
                              cpu_flags={"avx512_bf16", "amx_bf16"}, launcher=None)
    assert why == "auto: bf16, the CPU has amx_bf16/avx512_bf16"
    _, why = choose_precision("auto", device_type="cpu", cuda_capability=None, cpu_flags=NONE,
                              launcher="bf16")
    assert "wins over auto" in why
    _, why = choose_precision("auto", device_type="cuda", cuda_capability=(7, 5), cpu_flags=NONE,
                              launcher=None)
    assert why.startswith("auto: fp16 with loss scaling") and "compute capability 7.5" in why


def test_auto_precision_asks_the_local_gpus_capability_not_emulated_bf16(monkeypatch) -> None:
    """A T4 (7.5) reports is_bf16_supported() True (emulated): auto must still pick fp16, and
    ask LOCAL_RANK's device, never creating a tensor (a CUDA context) on cuda:0."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i=None: asked.append(i) or (7, 5))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    chosen, why = hardware.detect_precision("auto")
    assert chosen == "fp16" and asked == [3], (chosen, why, asked)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert hardware.detect_precision("auto")[0] == "bf16"


# Every reader of TF32 state, legacy and new API; run in a fresh process per case because
# the flags are process-wide (a mix of APIs set here would leak into later tests).
TF32_PROBE = """
import json, sys, torch
from further_pt.train import hardware
enabled, capability, dynamo = json.loads(sys.argv[1])
if dynamo:  # what Accelerator() does under --dynamo_backend with mixed_precision "no"
    torch.backends.cuda.matmul.allow_tf32 = True
note = hardware.configure_tf32(enabled, capability)
readers = {
    "allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
    "matmul_precision": torch.get_float32_matmul_precision,
    "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
    "matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
}
out = {"note": note}
for name, read in readers.items():
    try:
        out[name] = read()
    except Exception as exc:  # "mix of the legacy and new APIs"
        out[name] = f"raised: {str(exc)[:80]}"
print(json.dumps(out))
"""


@pytest.mark.parametrize("dynamo", [False, True], ids=["eager", "dynamo-backend"])
@pytest.mark.parametrize("enabled", [True, False], ids=["tf32", "ieee"])
def test_tf32_is_set_so_both_apis_read_it_back_and_agree(enabled: bool, dynamo: bool) -> None:
    """Issue 27 item 3: after setup every reader works (inductor, flex attention and
    accelerate read the legacy API) and says what train.tf32 asked for, with or without
    accelerate's dynamo backend having set the legacy flag first."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", TF32_PROBE, json.dumps([enabled, [8, 0], dynamo])],
                         capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.splitlines()[-1])
    assert got == {
        "note": f"TF32 for fp32 matmuls and convolutions: {'on' if enabled else 'off'} "
                f"(train.tf32={str(enabled).lower()})",
        "allow_tf32": enabled, "matmul_precision": "high" if enabled else "highest",
        "cudnn_allow_tf32": enabled, "matmul_fp32_precision": "tf32" if enabled else "ieee"}


def test_tf32_only_on_ampere_and_newer() -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    assert hardware.configure_tf32(True, (7, 0)) is None  # V100: no TF32 cores
    assert hardware.configure_tf32(True, None) is None  # a CPU run
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize(("name", "dtype", "tf32", "peak"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5e12),
    ("NVIDIA H100 NVL", torch.float16, False, 835.5e12),
    ("NVIDIA H200", torch.bfloat16, False, 989.4e12),
    ("NVIDIA H200 NVL", torch.bfloat16, False, 835.5e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156e12),
    ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5e12),
    ("NVIDIA L4", torch.bfloat16, False, 121e12),
    ("NVIDIA L40S", torch.bfloat16, False, 362.05e12),
    ("NVIDIA A10", torch.bfloat16, False, 125e12),
    ("Tesla V100-SXM2-16GB", torch.float16, False, 125e12),
    ("Tesla V100-PCIE-32GB", torch.float16, False, 112e12),
    ("Tesla T4", torch.float16, False, 65e12),
    ("NVIDIA B200", torch.bfloat16, False, 2250e12),
])
def test_mfu_peak_is_the_datasheet_dense_peak(name, dtype, tf32, peak) -> None:
    found, source = hardware.peak_flops(dtype, "cuda", tf32=tf32, device_name=name)
    assert found == peak and "datasheet" in source


def test_unknown_gpu_or_missing_dtype_is_measured_back_to_back(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "cuda_matmul_peak", lambda dtype: 123e12)
    assert hardware.datasheet_peak("Tesla T4", torch.bfloat16) is None  # T4 has no bf16 cores
    assert hardware.datasheet_peak("NVIDIA A10G", torch.bfloat16) is None  # not the A10
    found, source = hardware.peak_flops(torch.bfloat16, "cuda", device_name="NVIDIA RTX 9999")
    assert found == 123e12 and "measured, 20 back-to-back" in source
    assert hardware.si(989.4e12) == "989 TFLOP/s" and hardware.si(114816, "FLOP") == "115 kFLOP"


@pytest.mark.parametrize("bad", ["fp32", "AUTO", "", "bfloat16"])
def test_unknown_precision_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        choose_precision(bad, device_type="cpu", cuda_capability=None, cpu_flags=NONE,
                         launcher=None)


CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16
vmx flags\t: vnmi preemption_timer amx_bf16_fake
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpuinfo_flags() -> None:
    assert cpu_bf16_flags(CPUINFO) == {"amx_bf16", "avx512_bf16"}
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    assert cpu_bf16_flags(zen4) == {"avx512_bf16"}
    old = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert cpu_bf16_flags(old) == set()
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"
    assert cpu_bf16_flags(arm) == set()
    assert cpu_bf16_flags("") == set()


def test_cpuinfo_missing_means_no_flags(monkeypatch) -> None:
    assert cpu_bf16_flags() <= set(hardware.BF16_CPU_FLAGS)  # this machine: whatever it has

    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/proc/cpuinfo")

    monkeypatch.setattr(hardware, "open", missing, raising=False)
    assert cpu_bf16_flags() == set()


def test_thread_split() -> None:
    assert cpu_threads(1, {0, 1}) == 2
    assert cpu_threads(2, {0, 1}) == 1
    assert cpu_threads(2, {0}) == 1
    assert cpu_threads(3, set(range(8))) == 2
    assert cpu_threads(0, {0, 1, 2}) == 3  # a nonsense process count still gives the cores


@pytest.mark.parametrize(("env", "chosen"), [
    ({}, False),
    ({"OMP_NUM_THREADS": "1"}, True),  # plain python with OMP_NUM_THREADS=1: the user's
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}, False),  # accelerate's 1
    ({"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x"}, False),  # torchrun's 1
    ({"OMP_NUM_THREADS": "4", "ACCELERATE_MIXED_PRECISION": "no"}, True),
    ({"OMP_NUM_THREADS": " "}, False),
])
def test_who_chose_the_thread_count(env: dict[str, str], chosen: bool) -> None:
    assert user_chose_threads(env) is chosen


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_cpu_threads(restore_threads) -> None:
    share = cpu_threads(1)
    n, why = configure_cpu_threads(1, env={"OMP_NUM_THREADS": "1",
                                           "ACCELERATE_MIXED_PRECISION": "no"})
    assert n == share == torch.get_num_threads()
    assert "launcher's default" in why
    n, why = configure_cpu_threads(1, requested=1, env={})
    assert (n, torch.get_num_threads(), why) == (1, 1, "set in the recipe")
    n, why = configure_cpu_threads(1, env={"OMP_NUM_THREADS": "3"})
    assert n == 1 and why.startswith("OMP_NUM_THREADS=3 kept")  # kept, not changed
    n, _ = configure_cpu_threads(share * 4, env={})
    assert n == 1 == torch.get_num_threads()


def test_flops_per_token_is_the_hand_computation() -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
    # per layer: Q,K,V,O 4*(32*32+32)=4224; FFN in 32*64+64=2112; FFN out 64*32+32=2080;
    # two LayerNorms 2*2*32=128 -> 8544; two layers -> 17088 non-embedding parameters
    torch.manual_seed(0)
    n_params = sum(p.numel() for p in BertModel(config).encoder.parameters())
    assert n_params == 17088
    assert encoder_flops_per_token(config, 16) == 6 * 17088 + 12 * 2 * 32 * 16 == 114816
    # MLM head on half the tokens: 6 * (32*32 + 32*100) * 0.5 = 12672 more
    assert encoder_flops_per_token(config, 16, head_fraction=0.5) == 114816 + 12672


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_is_positive_finite_and_quick(dtype: torch.dtype) -> None:
    start = time.perf_counter()
    peak = matmul_peak_flops(dtype, n=64, seconds=0.01)
    assert time.perf_counter() - start < 2.0
    assert math.isfinite(peak) and peak > 1e6  # any CPU does > 1 MFLOP/s on a 64x64 matmul


@pytest.mark.parametrize("engine", ["DEEPSPEED", "MEGATRON_LM", "FSDP1"])
def test_engines_without_a_gather_path_are_refused_before_any_work(engine) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from further_pt.errors import SetupError
    from further_pt.train.launch import check_engine

    if engine == "FSDP1":
        acc = SimpleNamespace(distributed_type=DistributedType.FSDP,
                              state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
        match = "configured for FSDP version 1: further_pt shards with FSDP version 2"
    else:
        acc = SimpleNamespace(distributed_type=DistributedType[engine])
        match = rf"accelerate is configured for {engine}: further_pt trains data-parallel"
    with pytest.raises(SetupError, match=match):
        check_engine(acc)
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        assert check_engine(SimpleNamespace(distributed_type=DistributedType[fine])) is False
    assert check_engine(SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))) is True


def test_fsdp_on_cpu_processes_needs_torch_2_7(monkeypatch) -> None:
    """torch 2.6's FSDP2 calls torch.cpu.Stream.record_event, which 2.7 added: a one-line
    error before any work instead of an AttributeError in the first forward (CUDA: fine)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from further_pt.errors import SetupError
    from further_pt.train.launch import check_engine

    def fsdp(device: str) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device(device),
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))

    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    with pytest.raises(SetupError, match=r"^FSDP on CPU processes needs torch >= 2.7 \(this is "
                                         r"2.6.0\+cu124\)"):
        check_engine(fsdp("cpu"))
    assert check_engine(fsdp("cuda")) is True
    monkeypatch.setattr(torch, "__version__", "2.7.0")
    assert check_engine(fsdp("cpu")) is True
