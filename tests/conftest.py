"""Shared fixtures: real MNIST from CAPSNET_DATA_DIR (default ../shared/data), small models,
and checkpoints (a tiny untrained one for plumbing, the trained one for accuracy)."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # import CapsNet, common, data, predict without installing

from CapsNet import CapsNet, CapsNetConfig  # noqa: E402
from common import SHIPPED_CHECKPOINT, save_checkpoint  # noqa: E402
from data import load_split  # noqa: E402

# CAPSNET_DATA_DIR, else the workplace's shared copy, else train.py's default download folder.
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("CAPSNET_DATA_DIR") or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else REPO / "data"))
# Narrow layers keep the slow tests fast; routing, decoder and loss are the paper's.
SMALL = CapsNetConfig(conv1_channels=32, primary_channels=8)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (slow, needs chromium and playwright)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST on disk; tests never download it."""
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found in {DATA_DIR}/MNIST/raw (set CAPSNET_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    return load_split("mnist", data_dir, train=False)


@pytest.fixture(scope="session")
def mnist_train(data_dir):
    return load_split("mnist", data_dir, train=True)


@pytest.fixture
def small_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(SMALL)


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """The shipped model, else the file named by CAPSNET_TEST_CHECKPOINT, else skip."""
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    path = os.environ.get("CAPSNET_TEST_CHECKPOINT")
    if path and Path(path).is_file():
        return Path(path).resolve()  # notebooks run in other directories
    pytest.skip(f"no trained model: ship {SHIPPED_CHECKPOINT.name} or set CAPSNET_TEST_CHECKPOINT")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained, narrow CapsNet in checkpoint format: exercises the plumbing in milliseconds."""
    torch.manual_seed(0)
    config = CapsNetConfig(conv1_channels=8, primary_channels=2, decoder_hidden=(16, 32))
    model = CapsNet(config)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "config": config.to_dict(), "dataset": "mnist", "epoch": 0}, path)
    return path
