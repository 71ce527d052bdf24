"""Hugging Face Hub options: checked at start-up (the hub is off in tests), sd-scripts' --resume form for a state on
the Hub, and which files go where in the repo. No test reaches the network: the uploads are recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import resume_args, write_resume_world
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.training import hub
from lorakit.training.preflight import check_run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("hub"))


def test_resume_form():
    assert hub.parse_hub_resume("me/loras/run1/last-state") == ("me/loras", "run1/last-state", None, "model")
    assert hub.parse_hub_resume("me/loras/last-state:v2") == ("me/loras", "last-state", "v2", "model")
    assert hub.parse_hub_resume("me/data/s:main:dataset") == ("me/data", "s", "main", "dataset")


def test_unreachable_hub_stops_the_run_at_start_up(world, tmp_path):
    # HF_HUB_OFFLINE=1 in the tests: the run stops before any model loads, naming the option and the fix
    cfg, _ = parse_train_args(resume_args(world, tmp_path, "--huggingface_repo_id=me/loras", "--save_state_to_huggingface"))
    with pytest.raises(ConfigError, match="--huggingface_repo_id me/loras: the Hugging Face Hub is switched off"):
        check_run(cfg)
    cfg, _ = parse_train_args(resume_args(world, tmp_path, "--resume_from_huggingface", "--resume=me/loras/last-state"))
    with pytest.raises(ConfigError, match="--resume me/loras/last-state .--resume_from_huggingface.: cannot download"):
        check_run(cfg)


class RecordingApi:
    calls: list[tuple] = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, private=None):
        self.calls.append(("create", repo_id, private))

    def upload_file(self, repo_id, repo_type, path_or_fileobj, path_in_repo):
        self.calls.append(("file", Path(path_or_fileobj).name, path_in_repo))

    def upload_folder(self, repo_id, repo_type, folder_path, path_in_repo):
        self.calls.append(("folder", Path(folder_path).name, path_in_repo))


def test_uploads(world, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    cfg, _ = parse_train_args(resume_args(world, tmp_path, "--huggingface_repo_id=me/loras", "--async_upload",
                                          "--huggingface_path_in_repo=run1", "--save_state_to_huggingface"))
    uploader = hub.HubUploader(cfg)
    (tmp_path / "tiny-step00000003.safetensors").write_bytes(b"x")
    (tmp_path / "tiny-state").mkdir()
    uploader.file(tmp_path / "tiny-step00000003.safetensors")  # in the background
    uploader.state(tmp_path / "tiny-state", last=True)  # the last one waits
    uploader.finish()
    assert RecordingApi.calls[0] == ("create", "me/loras", True)  # private unless --huggingface_repo_visibility public
    assert sorted(RecordingApi.calls[1:]) == [("file", "tiny-step00000003.safetensors", "run1/tiny-step00000003.safetensors"),
                                              ("folder", "tiny-state", "run1/tiny-state")]
    cfg, _ = parse_train_args(resume_args(world, tmp_path, "--huggingface_repo_id=me/loras"))
    RecordingApi.calls = []
    uploader = hub.HubUploader(cfg)
    uploader.state(tmp_path / "tiny-state")  # states only with --save_state_to_huggingface
    uploader.file(tmp_path / "tiny-step00000003.safetensors")
    assert RecordingApi.calls[1:] == [("file", "tiny-step00000003.safetensors", "tiny-step00000003.safetensors")]
