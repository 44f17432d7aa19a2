"""MNIST as people have it on disk: the downloaded .gz files read directly, and a failed
download that leaves nothing behind in the user's folder."""

import gzip
import shutil

import pytest
import torch

from capslab.data import RAW_FILES, load_split
from capslab.errors import UserError


def test_gzipped_mnist_files_read_as_the_unpacked_ones(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        with open(data_dir / "MNIST" / "raw" / name, "rb") as src:
            with gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
    packed = load_split("mnist", tmp_path, train=False)
    unpacked = load_split("mnist", data_dir, train=False)
    assert torch.equal(packed.images, unpacked.images)
    assert torch.equal(packed.labels, unpacked.labels)


def test_a_failed_download_creates_no_folders(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr("torchvision.datasets.MNIST", offline)
    missing = tmp_path / "new" / "data"
    with pytest.raises(UserError, match="could not be downloaded") as error:
        load_split("mnist", missing, train=True)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # not even tmp_path / "new"
