"""MNIST-1D is the standard split; the MNIST reader reads IDX files in every layout."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from serimats_func import datasets
from serimats_func.core.data import as_tensors, epoch_order
from tests.conftest import tiny_mnist_arrays, write_idx


def test_mnist1d_is_the_standard_split_from_make_dataset_defaults():
    from mnist1d.data import get_dataset_args, make_dataset

    train, test = datasets.mnist1d()
    expected = make_dataset(get_dataset_args())
    assert (len(train), len(test)) == (4000, 1000)
    np.testing.assert_allclose(train.tensors[0].numpy(), expected["x"].astype(np.float32))
    np.testing.assert_array_equal(test.tensors[1].numpy(), expected["y_test"])
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64


def test_mnist1d_leaves_numpys_global_rng_alone():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    datasets._mnist1d_arrays.cache_clear()
    datasets.mnist1d()
    assert np.random.rand() == expected


@pytest.mark.parametrize("layout", ["flat", "torchvision", "plain"])
def test_mnist_reads_idx_files_gzipped_or_plain_in_either_layout(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if layout == "plain" else ".gz"
    images, labels = tiny_mnist_arrays(20, seed=3)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels)

    test = datasets.mnist(tmp_path, train=False)
    x, y = test.tensors
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy() * 255, images, atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_mnist_reads_the_real_test_split_when_it_is_there():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("shared MNIST files not present")
    x, y = datasets.mnist(root, train=False).tensors
    assert x.shape == (10000, 1, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]


def test_mnist_says_where_it_looked_when_files_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*not found; looked in.*Nothing is downloaded"):
        datasets.mnist(tmp_path)


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="is not an IDX file"):
        datasets.mnist(tmp_path, train=False)


def test_any_map_style_dataset_of_pairs_works():
    class Squares(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full(3, i, dtype=np.float32), i % 2

    x, y = as_tensors(Squares())
    assert x.shape == (5, 3) and y.tolist() == [0, 1, 0, 1, 0]


def test_a_dataset_of_pil_images_asks_for_a_transform():
    class Images(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return object(), 0

    with pytest.raises(ValueError, match="transforms.ToTensor"):
        as_tensors(Images())


def test_a_torchvision_mnist_dataset_works(mnist_root):
    torchvision = pytest.importorskip("torchvision")
    dataset = torchvision.datasets.MNIST(str(mnist_root), train=True, download=False,
                                         transform=torchvision.transforms.ToTensor())
    x, y = as_tensors(dataset)
    ours_x, ours_y = datasets.mnist(mnist_root, train=True).tensors
    torch.testing.assert_close(x, ours_x)
    assert torch.equal(y, ours_y)


def test_an_epoch_order_is_a_permutation_fixed_by_key_and_epoch():
    a, b = epoch_order(5, 0, 100), epoch_order(5, 1, 100)
    assert sorted(a.tolist()) == list(range(100)) and not torch.equal(a, b)
    assert torch.equal(a, epoch_order(5, 0, 100))
