"""The Docker files, tested without a Docker engine (none runs on the dev machines or in CI).

- the image's torch (from the FROM tag) is the one CI tests and meets the package's floors;
- the build context (.dockerignore) sends every COPY source and not ./data or ./runs;
- the entrypoint composes `accelerate launch` for 0, 1, 8 GPUs and several nodes (fake
  `accelerate` and `nvidia-smi`), fed the environment the compose files give it;
- the entrypoint refuses an output dir it cannot write, with one line, exit status 2.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from packaging.requirements import Requirement
from packaging.version import Version

from further_pt.train import gpu_driver

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PACKAGE = REPO / "further_pt"
TRANSFORMERS_5_TORCH = Version("2.6")  # transformers >= 5 disables older torch


# --------------------------------------------------------------------------- helpers
def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)


def _fakes(bin_dir: Path, gpus: int | None) -> None:
    """Fake accelerate / further-pt (print their argv and env) and nvidia-smi (`gpus` GPUs;
    None: fails as it does without a driver)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("accelerate", "further-pt"):
        _script(bin_dir / name, f'echo "{name} $*"\necho "TP=$TOKENIZERS_PARALLELISM"\n'
                                'echo "IFNAME=${NCCL_SOCKET_IFNAME-unset}"\n')
    if gpus is None:
        _script(bin_dir / "nvidia-smi", 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    else:
        lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" for i in range(gpus))
        _script(bin_dir / "nvidia-smi", f'[ "$1" = -L ] && printf "{lines}"\n')


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, gpus: int | None = None,
         cwd: Path | None = None, prefix: tuple[str, ...] = (),
         entrypoint: Path = ENTRYPOINT) -> subprocess.CompletedProcess[str]:
    """The entrypoint in a clean environment: fakes first on PATH, then the venv's python3."""
    bin_dir = tmp_path / "bin"
    _fakes(bin_dir, gpus)
    python_dir = str(Path(sys.executable).parent)
    full = {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
            **(env or {})}
    cwd = cwd or tmp_path
    full["PWD"] = str(cwd)
    return subprocess.run([*prefix, "bash", str(entrypoint), *args], capture_output=True,
                          text=True, env=full, cwd=cwd, check=False)


def _launched(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[0]


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- the image's torch
FROM_TAG = re.compile(
    r"^FROM\s+(?:--platform=\S+\s+)?pytorch/pytorch:(?P<torch>\d[\w.+]*)-cuda(?P<cuda>[^-\s]+)"
    r"-cudnn(?P<cudnn>\d+)-runtime(?:\s+AS\s+\S+)?\s*$", re.MULTILINE | re.IGNORECASE)


def image_torch(dockerfile: str) -> Version:
    """The torch of the image's base, from its one FROM line (pytorch/pytorch:T-cudaX-...)."""
    froms = re.findall(r"^FROM\s", dockerfile, re.MULTILINE | re.IGNORECASE)
    found = FROM_TAG.findall(dockerfile)
    assert len(froms) == 1 and len(found) == 1, "expected one FROM pytorch/pytorch:T-cudaX-... line"
    return Version(found[0][0])


def ci_torch(ci_run: str) -> Version:
    """The torch CI's newest set runs the whole suite on: .ci/run's one `CPU_TORCH=torch==X`.

    (Its floors set installs pyproject.toml's floor and its newest-torch set NEWEST_TORCH,
    for the smoke tests.)"""
    pins = re.findall(r"^CPU_TORCH=torch==([0-9][0-9A-Za-z.+!]*)\s*$", ci_run, re.MULTILINE)
    assert len(pins) == 1, f".ci/run should set CPU_TORCH=torch==X once, found {pins}"
    return Version(pins[0])


def torch_requirement(pyproject: dict) -> Requirement:
    reqs = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    torch = [r for r in reqs if r.name == "torch"]
    assert len(torch) == 1, "pyproject.toml should list torch once"
    return torch[0]


def torch_problems(dockerfile: str, ci_run: str, pyproject: dict) -> list[str]:
    """Why the image's torch is not the one the tests run, or not one the package accepts."""
    image, ci, req = image_torch(dockerfile), ci_torch(ci_run), torch_requirement(pyproject)
    problems = []
    if image.release != ci.release or image.pre != ci.pre:
        problems.append(f"the image has torch {image}, CI tests torch {ci} (.ci/run)")
    if not req.specifier.contains(image, prereleases=True):
        problems.append(f"the image's torch {image} does not meet pyproject.toml's {req}")
    if image < TRANSFORMERS_5_TORCH:
        problems.append(f"the image's torch {image} is below {TRANSFORMERS_5_TORCH}, "
                        "which transformers 5 needs")
    return problems


def _repo_files() -> tuple[str, str, dict]:
    return ((DOCKER / "Dockerfile").read_text(), (REPO / ".ci" / "run").read_text(),
            tomllib.loads((REPO / "pyproject.toml").read_text()))


def test_image_torch_is_the_one_ci_tests_and_meets_the_floors() -> None:
    dockerfile, ci_run, pyproject = _repo_files()
    assert torch_problems(dockerfile, ci_run, pyproject) == []
    assert torch_requirement(pyproject).specifier.contains(ci_torch(ci_run))
    # the README names the base image (the CUDA variant may be a build arg's default)
    cuda = FROM_TAG.search(dockerfile)["cuda"]
    if arg := re.fullmatch(r"\$\{?(\w+)\}?", cuda):
        cuda = re.search(rf"^ARG {arg[1]}=(\S+)$", dockerfile, re.MULTILINE)[1]
    base = f"pytorch/pytorch:{image_torch(dockerfile)}-cuda{cuda}-cudnn9-runtime"
    assert base in (REPO / "README.md").read_text()


def test_torch_check_fails_for_a_stale_or_mismatched_image() -> None:
    _, ci_run, pyproject = _repo_files()
    old = "FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\n"  # the image before issue 20
    problems = torch_problems(old, ci_run, pyproject)
    assert any("CI tests torch" in p for p in problems)
    assert any("transformers 5" in p for p in problems)
    ci = ci_torch(ci_run)
    newer = f"FROM pytorch/pytorch:{ci.major}.{ci.minor + 1}.0-cuda13.0-cudnn9-runtime\n"
    assert torch_problems(newer, ci_run, pyproject) == [
        f"the image has torch {ci.major}.{ci.minor + 1}.0, CI tests torch {ci} (.ci/run)"]
    floor = {"project": {"dependencies": [f"torch>={ci.major}.{ci.minor + 5}"]}}
    assert torch_problems(f"FROM pytorch/pytorch:{ci}-cuda13.0-cudnn9-runtime\n", ci_run,
                          floor) == [f"the image's torch {ci} does not meet pyproject.toml's "
                                     f"torch>={ci.major}.{ci.minor + 5}"]
    with pytest.raises(AssertionError):
        image_torch("FROM pytorch/pytorch:latest\n")


#: The CUDA builds of each torch release, which the pytorch/pytorch tags follow
#: (`T-cudaX-cudnn9-runtime`): torch's CUDA support matrix (12.8 left after 2.11; 2.12 to
#: 2.14 share one matrix). A new torch pin needs its row: its tags are checked here.
TORCH_CUDA_BUILDS = {"2.12": ("12.6", "13.0", "13.2"), "2.13": ("12.6", "13.0", "13.2"),
                     "2.14": ("12.6", "13.0", "13.2")}


def test_default_cuda_runs_on_the_drivers_clouds_run_and_13_is_a_build_argument() -> None:
    """Issue 27: CUDA 13 needs an NVIDIA driver >= 580, most cloud H100/A100 hosts run
    R535-R570: the default is a 12.x build of the same torch (a tag that exists), the
    one the launcher's driver line names, and the Dockerfile, README and Docker guide say
    how to build for CUDA 13.0."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert FROM_TAG.search(dockerfile)["cuda"] == "${CUDA}"
    default = re.search(r"^ARG CUDA=(\S+)$", dockerfile, re.MULTILINE)[1]
    assert Version(default).major == 12, default
    assert gpu_driver.MIN_DRIVER[12] <= 535  # R535, the oldest driver clouds commonly run
    assert default == gpu_driver.IMAGE_CUDA  # the build argument the driver line names
    torch = image_torch(dockerfile)
    builds = TORCH_CUDA_BUILDS[f"{torch.major}.{torch.minor}"]
    assert default in builds and "13.0" in builds
    guide = (REPO / "docs" / "guides" / "docker.md").read_text()
    for text in (dockerfile, (REPO / "README.md").read_text(), guide):
        assert "docker build --build-arg CUDA=13.0" in text
    assert f"pytorch/pytorch:{torch}-cuda{default}-cudnn9-runtime" in guide


def test_image_runs_as_non_root_and_compose_chains_the_stages() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "\nUSER 1000:1000\n" in dockerfile
    assert 'ENTRYPOINT ["further-pt-entrypoint"]' in dockerfile
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["pretrain"]["command"][0] == "pretrain"
    assert services["finetune"]["depends_on"]["pretrain"]["condition"] == (
        "service_completed_successfully")
    out = next(a for a in services["pretrain"]["command"] if a.startswith("output_dir="))
    model = next(a for a in services["finetune"]["command"]
                 if a.startswith("model.name_or_path="))
    assert model.split("=", 1)[1] == out.split("=", 1)[1] + "/final"


# --------------------------------------------------------------------------- build context
def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go filepath.Match plus `**`)."""
    pattern = os.path.normpath(pattern.strip("/"))
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_sent(path: str, dockerignore: str) -> bool:
    """Whether the build context holds ``path``: the last matching pattern decides, and a
    pattern that matches a parent folder matches everything in it."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    sent = True
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!"))
        if any(regex.fullmatch(c) for c in candidates):
            sent = exception
    return sent


def _copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile, re.MULTILINE):
        words = [w for w in line.split() if not w.startswith("--")]
        assert "--from" not in line
        sources += words[:-1]
    return sources


def test_build_context_sends_what_the_image_copies_and_no_data_or_runs() -> None:
    dockerignore = (REPO / ".dockerignore").read_text()
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    context = (DOCKER / compose["x-further-pt"]["build"]["context"]).resolve()
    assert context == REPO  # .dockerignore applies to the root of the context
    sources = _copy_sources((DOCKER / "Dockerfile").read_text())
    assert {"pyproject.toml", "README.md", "further_pt", "recipes",
            "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert is_sent(source, dockerignore), f"{source} is copied but .dockerignore drops it"
    for path in ("further_pt/__init__.py", "further_pt/pretrain.py", "recipes/demo.yaml",
                 "recipes/base/pretrain.yaml"):
        assert is_sent(path, dockerignore), path
    for path in ("data", "data/corpus/a.txt.gz", "runs", "runs/in_domain/checkpoints/x",
                 "outputs/x", ".git", ".git/HEAD", ".venv/bin/python", "docs/results/x.png",
                 "benchmarks/results/x.json", "further_pt/__pycache__/cli.cpython-312.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", "tests/test_docker.py", "corpus/big.txt"):
        assert not is_sent(path, dockerignore), path
    assert not is_sent("docker/compose.yaml", dockerignore)


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = "*\n!keep/\nkeep/**/*.tmp\n/data\n"
    assert not is_sent("x", rules) and not is_sent("x/y", rules)
    assert is_sent("keep", rules) and is_sent("keep/a/b.py", rules)
    assert not is_sent("keep/a/b.tmp", rules) and not is_sent("keep/b.tmp", rules)
    assert is_sent("x", "data\n") and not is_sent("data/a", "/data\n")


# --------------------------------------------------------------------------- launcher flags
def test_training_jobs_go_through_accelerate_launch(tmp_path) -> None:
    proc = _run(tmp_path, "pretrain", "recipe=in_domain", "data.train_files=[/data/a b.txt]",
                env={"ACCELERATE_ARGS": "--multi_gpu --num_processes 8"}, gpus=8)
    lines = proc.stdout.splitlines()
    assert _launched(proc) == (f"accelerate launch --multi_gpu --num_processes 8 "
                               f"{PACKAGE}/pretrain.py recipe=in_domain "
                               "data.train_files=[/data/a b.txt]")
    assert lines[1] == "TP=false"
    proc = _run(tmp_path, "finetune", "recipe=fit")  # nvidia-smi fails: accelerate decides
    assert _launched(proc) == f"accelerate launch {PACKAGE}/finetune.py recipe=fit"
    assert "accelerate launch (no launcher flags)" in proc.stderr


def test_other_jobs_go_through_the_cli_and_unknown_ones_fail(tmp_path) -> None:
    proc = _run(tmp_path, "experiment", "recipe=paper_grid")
    assert proc.stdout.splitlines()[0] == "further-pt experiment recipe=paper_grid"
    proc = _run(tmp_path, "prepare", "recipe=in_domain")
    assert proc.stdout.splitlines()[0] == "further-pt prepare recipe=in_domain"
    proc = _run(tmp_path, "train")
    assert proc.returncode == 2 and "got 'train'" in proc.stderr
    assert _run(tmp_path).returncode == 2


@pytest.mark.parametrize(("gpus_env", "visible", "flags"), [
    (None, 8, "--multi_gpu --num_processes 8"),   # GPUS unset: every GPU nvidia-smi lists
    (None, 1, "--num_processes 1"),               # one GPU: no --multi_gpu (accelerate refuses it)
    (None, 0, ""),                                # none listed: accelerate decides (CPU)
    (None, None, ""),                             # nvidia-smi fails: accelerate counts itself
    ("", 8, "--multi_gpu --num_processes 8"),     # compose passes an unset GPUS as ""
    ("1", 8, "--num_processes 1"),
    ("8", 8, "--multi_gpu --num_processes 8"),
    ("4", None, "--multi_gpu --num_processes 4"),
])
def test_gpus_sets_the_process_count(tmp_path, gpus_env, visible, flags) -> None:
    env = {"ACCELERATE_ARGS": "--mixed_precision bf16"}
    if gpus_env is not None:
        env["GPUS"] = gpus_env
    proc = _run(tmp_path, "pretrain", "recipe=demo", env=env, gpus=visible)
    expected = " ".join(w for w in ("--mixed_precision bf16", flags) if w)
    assert _launched(proc) == f"accelerate launch {expected} {PACKAGE}/pretrain.py recipe=demo"
    assert f"further-pt-entrypoint: accelerate launch {expected}" in proc.stderr


def test_launcher_flags_the_user_gave_are_kept(tmp_path) -> None:
    fsdp = "--config_file /opt/further_pt/docker/accelerate-fsdp.yaml"
    proc = _run(tmp_path, "pretrain", env={"ACCELERATE_ARGS": fsdp}, gpus=8)
    assert _launched(proc) == f"accelerate launch {fsdp} --num_processes 8 {PACKAGE}/pretrain.py"
    proc = _run(tmp_path, "pretrain", env={"ACCELERATE_ARGS": "--num_processes=2"}, gpus=8)
    assert _launched(proc) == f"accelerate launch --num_processes=2 {PACKAGE}/pretrain.py"
    proc = _run(tmp_path, "pretrain", env={"ACCELERATE_ARGS": "--cpu", "GPUS": "8"}, gpus=8)
    assert _launched(proc) == f"accelerate launch --cpu {PACKAGE}/pretrain.py"
    proc = _run(tmp_path, "pretrain", env={"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=8)
    assert _launched(proc) == (f"accelerate launch --multi_gpu --num_processes 2 "
                               f"{PACKAGE}/pretrain.py")


@pytest.mark.parametrize("gpus", ["0", "abc", "-1", "2.5"])
def test_a_bad_gpus_value_is_refused(tmp_path, gpus) -> None:
    line = _one_line_error(_run(tmp_path, "pretrain", env={"GPUS": gpus}, gpus=8))
    assert "GPUS must be a whole number >= 1" in line and f"(got '{gpus}')" in line


# --------------------------------------------------------------------------- compose wiring
_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: str, host: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        value = host.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op and op.endswith("?"):
            raise KeyError(f"compose refuses to start: {arg}")
        return arg if op else ""
    return _VAR.sub(one, value)


def _container_env(service: dict, host: dict[str, str]) -> dict[str, str]:
    """The service's environment as compose builds it; a key with no value passes the
    host's variable through, or leaves it unset."""
    env = {}
    for key, value in service["environment"].items():
        if value is None:
            if key in host:
                env[key] = host[key]
        else:
            env[key] = _interpolate(str(value), host)
    return env


def _service_command(service: dict, runs: Path) -> list[str]:
    """The service's command with the /runs volume at ``runs``."""
    return [a.replace("=/runs/", f"={runs}/") for a in service["command"]]


def test_compose_runs_with_gpus_unset_and_passes_gpus_through(tmp_path) -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    common = compose["x-further-pt"]
    assert "GPUS" in common["environment"] and common["environment"]["GPUS"] is None
    assert "--multi_gpu" not in str(common["environment"])
    assert "--num_processes" not in str(common["environment"])
    assert "/runs" in [v.split(":")[1] for v in common["volumes"]]
    assert common["shm_size"]
    pretrain = compose["services"]["pretrain"]
    runs = tmp_path / "runs"
    runs.mkdir()
    args = _service_command(pretrain, runs)
    tail = f"{PACKAGE}/pretrain.py {' '.join(args[1:])}"
    # No --mixed_precision by default: the recipe's `auto` picks bf16, fp16 (V100, T4: bf16
    # there is emulated) or fp32; a launcher flag would override it (issue 27 item 7).
    cases = [({}, 8, "--multi_gpu --num_processes 8"),
             ({}, 1, "--num_processes 1"),
             ({"GPUS": "1"}, 8, "--num_processes 1"),
             ({"GPUS": "8"}, 8, "--multi_gpu --num_processes 8"),
             ({"ACCELERATE_ARGS": "--mixed_precision fp16"}, 2,
              "--mixed_precision fp16 --multi_gpu --num_processes 2")]
    for host, visible, flags in cases:
        env = _container_env(pretrain, host)
        assert ("GPUS" in env) == ("GPUS" in host)
        proc = _run(tmp_path, *args, env=env, gpus=visible)
        assert _launched(proc) == f"accelerate launch {flags} {tail}", host


def test_multinode_compose_wires_host_network_nccl_and_ranks(tmp_path) -> None:
    compose = yaml.safe_load((DOCKER / "compose.multinode.yaml").read_text())
    node = compose["services"]["pretrain"]
    assert node["network_mode"] == "host"
    assert node.get("ipc") == "host" or node.get("shm_size")
    assert node["ulimits"]["memlock"] == -1
    env = node["environment"]
    for key in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME"):
        assert key in env, key
    assert any(v.endswith(":/runs") for v in node["volumes"])
    assert node["command"][0] == "pretrain"
    with pytest.raises(KeyError, match="NODE_RANK"):
        _container_env(node, {"NUM_NODES": "2", "MASTER_ADDR": "10.0.0.1"})

    runs = tmp_path / "runs"
    runs.mkdir()
    args = _service_command(node, runs)
    tail = f"{PACKAGE}/pretrain.py {' '.join(args[1:])}"
    host = {"NUM_NODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
            "GPUS_PER_NODE": "8"}
    proc = _run(tmp_path, *args, env=_container_env(node, host), gpus=8)
    assert _launched(proc) == (
        "accelerate launch --multi_gpu --num_processes 16 "
        "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 "
        f"--main_process_port 29500 {tail}")
    assert "IFNAME=unset" in proc.stdout  # compose's "" for an unset host variable is dropped
    # GPUS_PER_NODE unset: this node's GPUs; one GPU per node is still --multi_gpu (2 in all)
    host = {"NUM_NODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "6000",
            "NCCL_SOCKET_IFNAME": "ens5", "NCCL_IB_DISABLE": "1"}
    proc = _run(tmp_path, *args, env=_container_env(node, host), gpus=1)
    assert _launched(proc) == (
        "accelerate launch --multi_gpu --num_processes 2 "
        "--num_machines 2 --machine_rank 0 --main_process_ip node0 "
        f"--main_process_port 6000 {tail}")
    assert "IFNAME=ens5" in proc.stdout


@pytest.mark.parametrize(("env", "message"), [
    ({"NUM_NODES": "2", "MASTER_ADDR": "10.0.0.1"}, "needs NODE_RANK"),
    ({"NUM_NODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "(got '2')"),
    ({"NUM_NODES": "2", "NODE_RANK": "1"}, "needs MASTER_ADDR"),
    ({"NUM_NODES": "two", "NODE_RANK": "1", "MASTER_ADDR": "a"}, "NUM_NODES must be"),
    ({"NUM_NODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "x"},
     "MASTER_PORT must be"),
])
def test_multinode_settings_are_checked(tmp_path, env, message) -> None:
    assert message in _one_line_error(_run(tmp_path, "pretrain", env=env, gpus=8))


def test_single_node_ignores_node_settings(tmp_path) -> None:
    proc = _run(tmp_path, "pretrain", env={"NUM_NODES": "1", "NODE_RANK": "5"}, gpus=2)
    assert _launched(proc) == (f"accelerate launch --multi_gpu --num_processes 2 "
                               f"{PACKAGE}/pretrain.py")


# --------------------------------------------------------------------------- output dir check
def test_output_dir_that_cannot_be_created_is_refused(tmp_path) -> None:
    """Works as root too: nothing can be created under /proc or under a regular file."""
    if Path("/proc/self").is_dir():
        line = _one_line_error(_run(tmp_path, "pretrain", "output_dir=/proc/further-pt/run"))
        assert line.startswith("further-pt-entrypoint: output_dir /proc/further-pt/run: /proc "
                               "is not writable by uid ")
        assert "sudo chown -R" in line and 'docker run --user "$(id -u):$(id -g)"' in line
    (tmp_path / "a-file").write_text("x")
    for job in ("pretrain", "finetune", "experiment"):
        line = _one_line_error(_run(tmp_path, job, f"output_dir={tmp_path}/a-file/run"))
        assert line == (f"further-pt-entrypoint: output_dir {tmp_path}/a-file/run: "
                        f"{tmp_path}/a-file is a file, not a folder")
    # the last output_dir= wins; a relative one is under the working directory
    proc = _run(tmp_path, "pretrain", "output_dir=/proc/x", f"output_dir={tmp_path}/ok")
    assert proc.returncode == 0, proc.stderr
    line = _one_line_error(_run(tmp_path, "pretrain", "output_dir=a-file/run"))
    assert f"{tmp_path}/a-file is a file" in line
    # without output_dir=, the recipe's relative runs/NAME lands in the working directory
    line = _one_line_error(_run(tmp_path, "pretrain", "recipe=demo", cwd=Path("/proc")))
    assert line.startswith("further-pt-entrypoint: output_dir /proc: /proc is not writable")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".further-pt-write")]


@pytest.fixture
def unprivileged() -> tuple[str, ...]:
    """A command prefix that runs as an ordinary user: nothing as one, setpriv as root."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    return ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.fixture
def world_readable_dir():
    """A temp dir every user can enter (pytest's tmp_path may sit under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="further-pt-docker-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in path.rglob("*"):  # let cleanup remove what the test made read-only
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(path)


def test_unwritable_runs_folder_is_refused_naming_the_fix(unprivileged, world_readable_dir) -> None:
    base = world_readable_dir
    entrypoint = base / "entrypoint.sh"
    shutil.copy(ENTRYPOINT, entrypoint)
    entrypoint.chmod(0o755)
    runs = base / "runs"
    runs.mkdir()
    runs.chmod(0o555)  # the volume, owned by someone else (or read-only)
    proc = _run(base / "home", "pretrain", "output_dir=" + str(runs / "in_domain"),
                prefix=unprivileged, entrypoint=entrypoint, cwd=base)
    (base / "home").chmod(0o755)
    line = _one_line_error(proc)
    uid, gid = ("65534", "65534") if unprivileged else (str(os.getuid()), str(os.getgid()))
    # the README quotes this line for uid 1000 and the volume at /runs
    readme = line.replace(str(base), "").replace(f"uid {uid} (gid {gid})", "uid 1000 (gid 1000)")
    readme = readme.replace(f"chown -R {uid}:{gid}", "chown -R 1000:1000")
    assert readme in (REPO / "README.md").read_text(), readme
    assert "fix: on the host, sudo chown -R" in line


def test_output_dir_on_a_mount_whose_parent_is_read_only_runs(unprivileged,
                                                              world_readable_dir) -> None:
    """output_dir=/runs: the volume is writable, / is not; the run's lock goes inside it."""
    base = world_readable_dir
    entrypoint = base / "entrypoint.sh"
    shutil.copy(ENTRYPOINT, entrypoint)
    entrypoint.chmod(0o755)
    top = base / "top"
    runs = top / "runs"
    runs.mkdir(parents=True)
    if unprivileged:
        os.chown(runs, 65534, 65534)
    runs.chmod(0o755)
    top.chmod(0o555)
    home = base / "home"
    # a fake python3 names the package, which the unprivileged user may not be able to
    # import from this checkout
    (home / "bin").mkdir(parents=True, exist_ok=True)
    for out in (runs, runs / "in_domain"):
        _run(home, "config", prefix=unprivileged, entrypoint=entrypoint, cwd=base)  # the fakes
        _script(home / "bin" / "python3", 'echo /opt/further_pt/further_pt\n')
        home.chmod(0o755)
        for p in home.rglob("*"):
            p.chmod(0o755)
        proc = _run(home, "pretrain", f"output_dir={out}", prefix=unprivileged,
                    entrypoint=entrypoint, cwd=base)
        assert _launched(proc) == ("accelerate launch /opt/further_pt/further_pt/pretrain.py "
                                   f"output_dir={out}"), proc.stderr


def test_every_cli_verb_goes_through_the_image_entrypoint(tmp_path) -> None:
    """doctor, select and sweeps (`-m`) reach the further-pt command; --help and help too."""
    for args in (("doctor",), ("select", "corpus=[a.txt]", "task=t.jsonl", "output=o.txt.gz"),
                 ("pretrain", "-m", "recipe=demo", "train.lr=1e-4,2e-4"),
                 ("finetune", "--help")):
        proc = _run(tmp_path, *args)
        assert _launched(proc) == "further-pt " + " ".join(args), proc.stderr
    proc = _run(tmp_path, "--help")
    assert proc.returncode == 0 and "select, doctor" in proc.stdout
