"""docs/results/tapt-powered/pool.py: a block's second report (``part``) sits beside its first."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

POOL = Path(__file__).resolve().parents[1] / "docs" / "results" / "tapt-powered" / "pool.py"


def _pool():
    spec = importlib.util.spec_from_file_location("tapt_pool", POOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _experiment(out: Path, report: str, heldout: dict[str, float | None]) -> None:
    out.mkdir(exist_ok=True)
    (out / "stages.json").write_text(json.dumps({"finetune-fit-n400-seed1": {"seconds": 2.0}}))
    (out / "report.md").write_text(report)
    (out / "heldout_in_domain.json").write_text(json.dumps(heldout))
    stage = out / "finetune-fit-n400-seed1"
    stage.mkdir(exist_ok=True)
    (stage / "metrics.json").write_text(json.dumps(
        {"eval_error_rate": 0.25, "best_epoch": 1, "history": [{"eval_error_rate": 0.25}]}))


def test_archive_part_keeps_the_main_report_and_merges_heldout(tmp_path: Path) -> None:
    pool, out, block = _pool(), tmp_path / "out", tmp_path / "block"
    _experiment(out, "main ![e](error_rates.png)", {"fit": None, "itpt": 4.95})
    pool.archive(out, block)
    _experiment(out, "steps ![e](error_rates.png)", {"fit": None, "itpt_4000": 4.40})
    pool.archive(out, block, "steps")
    assert (block / "report.md").read_text() == "main ![e](error_rates.png)"
    assert (block / "steps-report.md").read_text() == "steps ![e](steps-error_rates.png)"
    assert json.loads((block / "heldout_in_domain.json").read_text()) == {
        "fit": None, "itpt": 4.95, "itpt_4000": 4.40}
    assert (block / "seeds.csv").read_text().splitlines()[1].startswith("fit,400,1,0.25,1,1,")
