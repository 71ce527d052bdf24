"""Hugging Face Hub: uploading the run's files (`--huggingface_repo_id`) and resuming from a state on the Hub
(`--resume_from_huggingface`), through `huggingface_hub`, as sd-scripts' `huggingface_util` does.

* Every saved LoRA file is uploaded to `<--huggingface_path_in_repo>/<file name>` of the repo (the repo root when
  no path is given), and with `--save_state_to_huggingface` every state folder too. The repo is created at the
  first upload when it does not exist: private unless `--huggingface_repo_visibility public`. With
  `--async_upload` uploads run in the background, except the last, which the run waits for.
* `--resume_from_huggingface --resume <owner>/<repo>/<path in repo>[:<revision>[:<repo type>]]` downloads that
  state folder first and resumes from the download.
* The token is `--huggingface_token`, else the `HF_TOKEN` variable or a `huggingface-cli login`.
* Everything the Hub must allow is checked at start-up, before any model loads: the package, the network (a run
  with `HF_HUB_OFFLINE=1` or without a connection stops there), the token for creating a repo, the state to
  resume. An upload that fails during training is reported and training goes on (the files stay in
  `--output_dir`), as in sd-scripts.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("lorakit")


def wants_hub(cfg: Any) -> bool:
    return bool(cfg.huggingface_repo_id or cfg.resume_from_huggingface)


def _api(cfg: Any) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=cfg.huggingface_token or None)


def parse_hub_resume(value: str) -> tuple[str, str, str | None, str]:
    """(repo id, path in repo, revision, repo type) from sd-scripts' `--resume` form for a state on the Hub."""
    parts = value.split("/")
    repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
    revision, repo_type = None, "model"
    if ":" in path:
        pieces = path.split(":")
        path, revision = pieces[0], pieces[1] or None
        if len(pieces) > 2:
            repo_type = pieces[2] or "model"
    return repo_id, path.strip("/"), revision, repo_type


def hub_problems(cfg: Any) -> list[str]:
    """What stops the run's Hub uploads or download, found at start-up."""
    if not wants_hub(cfg):
        return []
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return ["--huggingface_repo_id / --resume_from_huggingface need the huggingface_hub package: "
                "pip install huggingface_hub"]
    problems = []
    if cfg.resume_from_huggingface and not cfg.resume:
        problems.append("--resume_from_huggingface needs --resume <owner>/<repo>/<state folder>[:<revision>[:<type>]]")
    if cfg.huggingface_repo_id:
        problems += _upload_problems(cfg)
    return problems


def _upload_problems(cfg: Any) -> list[str]:
    from huggingface_hub import get_token
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    where = f"--huggingface_repo_id {cfg.huggingface_repo_id}"
    try:
        _api(cfg).repo_info(cfg.huggingface_repo_id, repo_type=cfg.huggingface_repo_type)
        return []
    except RepositoryNotFoundError:
        if cfg.huggingface_token or get_token():
            return []  # created at the first upload
        return [f"{where}: the repo does not exist and there is no token to create it: pass --huggingface_token, set "
                "HF_TOKEN or run `huggingface-cli login`"]
    except OfflineModeIsEnabled:
        return [f"{where}: the Hugging Face Hub is switched off on this machine (HF_HUB_OFFLINE=1); unset it, or "
                "remove the upload options and upload the files from --output_dir yourself"]
    except Exception as error:  # connection errors come in many types; each one means the same here
        return [f"{where}: the Hugging Face Hub cannot be reached ({type(error).__name__}: {error}); check the "
                "connection and the token, or remove the upload options and upload from --output_dir yourself"]


def download_hub_state(cfg: Any, problems: list[str]) -> None:
    """--resume_from_huggingface: download the state folder; `cfg.resume` becomes the local copy."""
    if not cfg.resume_from_huggingface or not cfg.resume:
        return
    from huggingface_hub import snapshot_download

    repo_id, path, revision, repo_type = parse_hub_resume(cfg.resume)
    try:
        root = snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=cfg.huggingface_token or None,
                                 allow_patterns=[f"{path}/*"] if path else None)
    except Exception as error:  # offline, missing repo or revision, bad token: the run cannot start
        problems.append(f"--resume {cfg.resume} (--resume_from_huggingface): cannot download the state "
                        f"({type(error).__name__}: {error})")
        return
    local = Path(root) / path
    log.info("--resume_from_huggingface: downloaded %s to %s", cfg.resume, local)
    cfg.resume = str(local)


class HubUploader:
    """Uploads the run's saved files (and states) to the repo, in the background with --async_upload."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.enabled = bool(cfg.huggingface_repo_id)
        self.threads: list[threading.Thread] = []
        self.created = False
        self.uploaded: list[str] = []  # paths in the repo

    def file(self, path: Path, last: bool = False) -> None:
        if self.enabled:
            self._submit(path, last)

    def state(self, path: Path, last: bool = False) -> None:
        if self.enabled and self.cfg.save_state_to_huggingface:
            self._submit(path, last)

    def _submit(self, path: Path, last: bool) -> None:
        if self.cfg.async_upload and not last:
            thread = threading.Thread(target=self._upload, args=(path,), daemon=True)
            thread.start()
            self.threads.append(thread)
        else:
            self._upload(path)

    def finish(self) -> None:
        """Wait for the background uploads."""
        for thread in self.threads:
            thread.join()
        self.threads = []

    def _upload(self, path: Path) -> None:
        cfg = self.cfg
        base = (cfg.huggingface_path_in_repo or "").strip("/")
        target = f"{base}/{path.name}" if base else path.name
        api = _api(cfg)
        try:
            if not self.created:
                api.create_repo(cfg.huggingface_repo_id, repo_type=cfg.huggingface_repo_type, exist_ok=True,
                                private=cfg.huggingface_repo_visibility != "public")
                self.created = True
            if path.is_dir():
                api.upload_folder(repo_id=cfg.huggingface_repo_id, repo_type=cfg.huggingface_repo_type,
                                  folder_path=str(path), path_in_repo=target)
            else:
                api.upload_file(repo_id=cfg.huggingface_repo_id, repo_type=cfg.huggingface_repo_type,
                                path_or_fileobj=str(path), path_in_repo=target)
            self.uploaded.append(target)
            log.info("uploaded %s to %s/%s", path, cfg.huggingface_repo_id, target)
        except Exception as error:  # training goes on; the file stays in --output_dir
            log.error("upload of %s to %s failed (%s: %s); the file stays in %s", path, cfg.huggingface_repo_id,
                      type(error).__name__, error, path.parent)
