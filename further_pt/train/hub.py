"""Hub: publish a run's models to the Hugging Face Hub (``hub.*`` keys).

``hub.model_id`` names the repository; ``hub.strategy: end`` uploads ``final/`` once the
run ends, ``every_checkpoint`` also each checkpoint's model (never its optimizer state) as
it is written, so a long run can be followed or picked up from the Hub. The token comes
from the environment as huggingface_hub reads it (``HF_TOKEN``, or ``hf auth login``).
Whatever would make the upload fail for certain (offline mode, no token, a malformed
repository id) is refused before any work, not after 100K steps; the repository is created
(``exist_ok``) when the run starts, so a token without write access fails then too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import huggingface_hub

from further_pt.errors import SetupError

logger = logging.getLogger(__name__)

#: A checkpoint's files that are not the model: they stay on disk.
NOT_THE_MODEL = ["optimizer.pt", "scheduler.pt", "trainer_state.json", "*.tmp"]


def wanted(cfg: Any) -> bool:
    return "hub" in cfg and cfg.hub.model_id is not None


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in ("1", "ON", "YES", "TRUE") or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_reachable(cfg: Any) -> None:
    """Before any work: an upload that cannot happen is a one-line error now."""
    if not wanted(cfg):
        return
    if _offline():
        raise SetupError(f"hub.model_id={cfg.hub.model_id}: HF_HUB_OFFLINE is set, so nothing "
                         "can be uploaded; unset it, or run with hub.model_id=null and upload "
                         "final/ later (huggingface-cli upload)")
    if huggingface_hub.get_token() is None:
        raise SetupError(f"hub.model_id={cfg.hub.model_id}: no Hugging Face token; set HF_TOKEN "
                         "or run `hf auth login` (a token with write access)")


def create(cfg: Any) -> None:
    """The repository (and branch), created if missing: permissions fail here, at the start."""
    h = cfg.hub
    api = huggingface_hub.HfApi()
    api.create_repo(h.model_id, private=h.private, exist_ok=True, repo_type="model")
    if h.revision is not None:
        api.create_branch(h.model_id, branch=h.revision, exist_ok=True, repo_type="model")


def upload(cfg: Any, folder: Path, message: str) -> None:
    """Upload a model folder to ``hub.model_id`` (at ``hub.revision``)."""
    h = cfg.hub
    info = huggingface_hub.HfApi().upload_folder(
        repo_id=h.model_id, folder_path=str(folder), repo_type="model", revision=h.revision,
        commit_message=message, ignore_patterns=NOT_THE_MODEL)
    logger.info("uploaded %s to the Hub: %s", folder, getattr(info, "commit_url", h.model_id))
