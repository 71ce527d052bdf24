"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

# Tiny models run fastest on one thread: with more, thread start-up and contention cost more than the math.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """What lorakit remembers between runs (checked images) goes to a folder of this test session."""
    os.environ["LORAKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("lorakit-cache"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (e.g. the mixed precision); each in-process run starts afresh."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def restore_root_logging():
    """For tests of --console_log_*: the root logger's handlers and level as they were before the run."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
