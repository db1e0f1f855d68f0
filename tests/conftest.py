import gzip
import itertools
import struct

import numpy as np
import pytest
import torch

from tests import builders


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
    return builders.small_mnist1d()


@pytest.fixture(autouse=True)
def plan_cache_dir(tmp_path, monkeypatch):
    """Each test its own cache of measured plans (acceleration.plan_cache), empty: no test reads the user's, or
    another test's, choices; the in-process caches are emptied too."""
    from serimats_func.acceleration import plan_cache, prepare

    monkeypatch.setenv(plan_cache.CACHE_ENV, str(tmp_path / "plan-cache"))
    monkeypatch.setattr(prepare, "_CHOSEN", {})
    monkeypatch.setattr(prepare, "_EVALUATIONS", {})
    return tmp_path / "plan-cache"


@pytest.fixture
def store(tmp_path):
    return tmp_path / "runs" / "test.zarr"


@pytest.fixture
def experiment(tmp_path):
    """The tests' one way to build an Experiment: ``experiment(interventions, **settings)``, which is
    tests.builders.make_experiment (the small MNIST-1D split, a 32-unit MLP, 16 steps of batch 32, no progress
    bar) with a fresh store per call. Any Experiment argument overrides these (``model=``, ``data=(train, test)``,
    ``store=``...)."""
    count = itertools.count()

    def build(interventions=(), **settings):
        settings.setdefault("store", tmp_path / "runs" / f"run{next(count)}.zarr")
        return builders.make_experiment(interventions, **settings)

    return build


@pytest.fixture(scope="session")
def mnist_digits():
    """Real MNIST digits when ../shared/data/mnist holds them (the first 8,000 of the test split), else tiny
    synthetic IDX-like digits: (x (n, 1, 28, 28), y (n,))."""
    from pathlib import Path

    from serimats_func import datasets

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
    if (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
        return datasets.mnist(root, train=False).tensors
    images, labels = tiny_mnist_arrays(512, seed=5)
    return torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


@pytest.fixture(autouse=True)
def _keep_global_rng(request):
    """Every test runs from the same global RNG state; the library must not depend on it."""
    torch.manual_seed(1234)
