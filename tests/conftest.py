import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file; gzip-compressed when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def tiny_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like images: a bright bar whose row depends on the label, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    """A torchvision-style folder ROOT/MNIST/raw with tiny train (96) and test (48) IDX files
    (uncompressed, as torchvision leaves them after extracting)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 96, 0), ("t10k", 48, 1)):
        images, labels = tiny_mnist_arrays(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def small_mnist1d():
    """The first 512 / 256 examples of the standard MNIST-1D split: fast to train on."""
    from serimats_func import datasets

    train, test = datasets.mnist1d()
    return (TensorDataset(*(t[:512] for t in train.tensors)), TensorDataset(*(t[:256] for t in test.tensors)))


@pytest.fixture
def store(tmp_path):
    return tmp_path / "runs" / "test.zarr"


@pytest.fixture(autouse=True)
def _keep_global_rng(request):
    """Every test runs from the same global RNG state; the library must not depend on it."""
    torch.manual_seed(1234)
