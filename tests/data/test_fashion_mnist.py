"""The Fashion-MNIST reader: Debian's idx files, the model-ready tensors, the folder writer."""
import gzip

import numpy as np
import pytest
import torch

from edgevit.data import fashion_mnist
from edgevit.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_raw,
    read_idx,
    write_image_folder,
)
from edgevit.data.images import ImageFolder, Preprocessing
from edgevit.core.errors import EdgevitError
from edgevit.models import get_model_cfg
from tests.data import require_fashion_mnist


@pytest.fixture
def dataset():
    require_fashion_mnist()


def test_raw_splits(dataset):
    images, labels = load_raw("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.min() == 0 and labels.max() == 9
    images, labels = load_raw("test")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert 60 < images.mean() < 90  # real clothing, not zeros


def test_model_ready_tensors(dataset):
    cfg = get_model_cfg("levit_128s").replace(input_size=(3, 48, 48))
    test = load_fashion_mnist("test", cfg)
    assert len(test) == 10000 and test.classes == FASHION_MNIST_CLASSES
    images, labels = test.batch(range(8))
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == load_raw("test")[1][:8].tolist()
    # grey repeated to 3 channels, then normalised per channel with the model's mean/std
    pixels = images * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # the same size as the idx file: values are the raw pixels / 255
    native = load_fashion_mnist("test", Preprocessing((3, 28, 28), 1.0, "bilinear", (0.0,) * 3, (1.0,) * 3))
    raw = torch.from_numpy(load_raw("test")[0][:4].astype(np.float32) / 255)
    assert torch.allclose(native.batch(range(4))[0][:, 0], raw)
    image, label = test[3]
    assert image.shape == (3, 48, 48) and int(label) == int(labels[3])


def test_limit_is_a_fixed_seed_subset(dataset):
    cfg = get_model_cfg("levit_128s")
    first = load_fashion_mnist("train", cfg, limit=500, seed=1)
    again = load_fashion_mnist("train", cfg, limit=500, seed=1)
    other = load_fashion_mnist("train", cfg, limit=500, seed=2)
    assert len(first) == 500 and torch.equal(first.labels, again.labels) and torch.equal(first.pixels, again.pixels)
    assert not torch.equal(first.pixels, other.pixels)
    assert len(set(first.labels.tolist())) == 10
    with pytest.raises(EdgevitError, match="at least 1"):
        load_fashion_mnist("train", cfg, limit=0)
    with pytest.raises(EdgevitError, match="choose train or test"):
        load_fashion_mnist("validation", cfg)


def test_write_image_folder(dataset, tmp_path):
    written = write_image_folder("test", tmp_path, per_class=3, seed=0)
    assert len(written) == 30
    folder = ImageFolder(tmp_path, get_model_cfg("levit_128s"))
    assert sorted(folder.classes) == sorted(fashion_mnist.folder_name(c) for c in FASHION_MNIST_CLASSES)
    assert "T-shirt_top" in folder.classes and len(folder) == 30
    assert write_image_folder("test", tmp_path / "again", per_class=3, seed=0)[0].name == written[0].name


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVIT_FASHION_MNIST", str(tmp_path))
    load_raw.cache_clear()
    try:
        with pytest.raises(EdgevitError, match="apt-get install dataset-fashion-mnist"):
            load_raw("test")
    finally:
        load_raw.cache_clear()


def test_idx_reader_checks_its_header(tmp_path):
    good = tmp_path / "ok-idx1-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    assert read_idx(good).tolist() == [7, 8, 9]
    short = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + bytes([7]))
    with pytest.raises(EdgevitError, match="not what its header says"):
        read_idx(short)
    (tmp_path / "text.gz").write_bytes(b"plain")
    with pytest.raises(EdgevitError, match="corrupt"):
        read_idx(tmp_path / "text.gz")
