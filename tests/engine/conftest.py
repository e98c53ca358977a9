"""Engine fixtures: one tiny random Llama folder and text datasets per test session; fresh model copies per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.utils.factories import build_tiny_model, write_jsonl_dataset, write_text_dataset
from worker.engine.load.checkpoint import LoadedModel, load_model


@pytest.fixture(scope="module")
def one_thread():
    """The CPU is shared: one thread keeps kernel tests and their timings quick and steady (use per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_dataset(tmp_path_factory.mktemp("data") / "eval.txt")


@pytest.fixture(scope="session")
def jsonl_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl_dataset(tmp_path_factory.mktemp("data") / "calib.jsonl")


@pytest.fixture()
def tiny(tiny_model_dir: Path) -> LoadedModel:
    """A freshly loaded tiny model (tests change it in place)."""
    return load_model(tiny_model_dir, "hf", torch.device("cpu"))
