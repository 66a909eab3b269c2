"""The Docker entrypoint forwards to `accelerate launch` (no Docker engine needed)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import yaml
from helpers import REPO

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _fake(bin_dir: Path, name: str) -> None:
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*"\necho "TP=$TOKENIZERS_PARALLELISM"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir, "accelerate")
    _fake(bin_dir, "further-pt")
    import sys

    python_dir = str(Path(sys.executable).parent)
    full = {**os.environ, "PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", **(env or {})}
    full.pop("TOKENIZERS_PARALLELISM", None)
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=full, check=False)


def test_training_jobs_go_through_accelerate_launch(tmp_path) -> None:
    proc = _run(tmp_path, "pretrain", "recipe=in_domain", "data.train_files=[/data/a b.txt]",
                env={"ACCELERATE_ARGS": "--multi_gpu --num_processes 8"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    package = REPO / "further_pt"
    assert lines[0] == (f"accelerate launch --multi_gpu --num_processes 8 {package}/pretrain.py "
                        "recipe=in_domain data.train_files=[/data/a b.txt]")
    assert lines[1] == "TP=false"
    proc = _run(tmp_path, "finetune", "recipe=fit")
    assert proc.stdout.splitlines()[0] == f"accelerate launch {package}/finetune.py recipe=fit"


def test_other_jobs_go_through_the_cli_and_unknown_ones_fail(tmp_path) -> None:
    proc = _run(tmp_path, "experiment", "recipe=paper_grid")
    assert proc.stdout.splitlines()[0] == "further-pt experiment recipe=paper_grid"
    proc = _run(tmp_path, "train")
    assert proc.returncode == 2 and "got 'train'" in proc.stderr
    assert _run(tmp_path).returncode == 2


def test_image_runs_as_non_root_and_compose_chains_the_stages() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "\nUSER 1000:1000\n" in dockerfile
    assert 'ENTRYPOINT ["further-pt-entrypoint"]' in dockerfile
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["pretrain"]["command"][0] == "pretrain"
    assert services["finetune"]["depends_on"]["pretrain"]["condition"] == (
        "service_completed_successfully")
    out = next(a for a in services["pretrain"]["command"] if a.startswith("output_dir="))
    model = next(a for a in services["finetune"]["command"]
                 if a.startswith("model.name_or_path="))
    assert model.split("=", 1)[1] == out.split("=", 1)[1] + "/final"
