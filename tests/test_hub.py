"""Publishing to the Hub, tested at its boundary (offline): the exact folders and arguments
handed to huggingface_hub, and the refusals that come before any work."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
from helpers import pretrain_overrides

from further_pt.pretrain import main as pretrain_main
from further_pt.train import hub


def _args(tmp_path: Path, corpus: Path, model_dir: Path, **extra: object) -> list[str]:
    return pretrain_overrides(tmp_path / "run", corpus, model_dir, tmp_path / "cache",
                              **{"hub.model_id": "me/tiny-further", **extra})


def test_offline_the_run_is_refused_before_any_work(tmp_path, corpus_file, tiny_model_dir,
                                                    capsys) -> None:
    assert pretrain_main(_args(tmp_path, corpus_file, tiny_model_dir)) == 2  # HF_HUB_OFFLINE=1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("further_pt: error: hub.model_id=me/tiny-further:"
                                               " HF_HUB_OFFLINE is set")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_without_a_token_the_run_is_refused_before_any_work(tmp_path, corpus_file,
                                                            tiny_model_dir, monkeypatch,
                                                            capsys) -> None:
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert pretrain_main(_args(tmp_path, corpus_file, tiny_model_dir)) == 2
    assert "no Hugging Face token; set HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def online(monkeypatch) -> type:
    """The Hub reachable with a token, and huggingface_hub's HfApi replaced by FakeApi."""
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    return FakeApi


class FakeApi:
    """Records what further_pt hands huggingface_hub, and the files each upload would send."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id: str, **kwargs) -> None:
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs) -> None:
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs) -> None:
        root = Path(kwargs["folder_path"])
        sent = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not any(
            fnmatch.fnmatch(p.name, pattern) for pattern in kwargs["ignore_patterns"]))
        FakeApi.calls.append(("upload_folder", {**kwargs, "sent": sent}))


def test_every_checkpoint_and_the_final_model_are_uploaded(tmp_path, corpus_file, tiny_model_dir,
                                                           online) -> None:
    args = _args(tmp_path, corpus_file, tiny_model_dir, **{
        "hub.strategy": "every_checkpoint", "hub.revision": "exp1"})
    assert pretrain_main(args) == 0
    out = tmp_path / "run"
    kinds = [name for name, _ in FakeApi.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder", "upload_folder",
                     "upload_folder"]
    assert FakeApi.calls[0][1] == {"repo_id": "me/tiny-further", "private": True,
                                   "exist_ok": True, "repo_type": "model"}
    assert FakeApi.calls[1][1] == {"repo_id": "me/tiny-further", "branch": "exp1",
                                   "exist_ok": True, "repo_type": "model"}
    uploads = [c for name, c in FakeApi.calls if name == "upload_folder"]
    assert [u["folder_path"] for u in uploads] == [
        str(out / "checkpoints" / "step-000003"), str(out / "checkpoints" / "step-000006"),
        str(out / "final")]
    assert all(u["repo_id"] == "me/tiny-further" and u["revision"] == "exp1"
               and u["repo_type"] == "model" for u in uploads)
    assert [u["commit_message"] for u in uploads] == [
        "further_pt: checkpoint at step 3", "further_pt: checkpoint at step 6",
        "further_pt: final model, last step (6)"]
    model_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "manifest.json"}
    for u in uploads[:2]:  # a checkpoint's model, never its optimizer state
        assert model_files <= set(u["sent"]) and "optimizer.pt" not in u["sent"]
        assert "trainer_state.json" not in u["sent"] and "scheduler.pt" not in u["sent"]
    assert set(uploads[2]["sent"]) == set(json.loads(
        (out / "final" / "manifest.json").read_text())["files"]) | {"manifest.json"}
    assert "README.md" in uploads[2]["sent"]  # with its model card


def test_end_uploads_the_final_model_only(tmp_path, corpus_file, tiny_model_dir,
                                          online) -> None:
    assert pretrain_main(_args(tmp_path, corpus_file, tiny_model_dir,
                               **{"hub.private": "false"})) == 0
    assert [name for name, _ in FakeApi.calls] == ["create_repo", "upload_folder"]
    assert FakeApi.calls[0][1]["private"] is False
    assert FakeApi.calls[1][1]["folder_path"] == str(tmp_path / "run" / "final")
    assert FakeApi.calls[1][1]["revision"] is None


@pytest.mark.parametrize(("model_id", "message"), [
    ("me/my model", "'hub.model_id': 'me/my model' is not a Hub repository id"),
    ("me/-dash", "'hub.model_id': 'me/-dash' is not a Hub repository id")])
def test_a_bad_repository_id_is_a_recipe_error(tmp_path, corpus_file, tiny_model_dir, capsys,
                                               model_id, message) -> None:
    assert pretrain_main(_args(tmp_path, corpus_file, tiny_model_dir,
                               **{"hub.model_id": model_id})) == 2
    assert message in capsys.readouterr().err
