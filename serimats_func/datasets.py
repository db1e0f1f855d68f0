"""Ready-made datasets: MNIST-1D (generated offline) and MNIST read from IDX files.

Both return ``torch.utils.data.TensorDataset``s of ``(x, y)``: float32 inputs, int64 labels.

>>> train, test = mnist1d()
>>> len(train), len(test), tuple(train[0][0].shape)
(4000, 1000, (40,))
"""

from __future__ import annotations

import functools
import gzip
import random
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["mnist1d", "mnist", "read_idx"]


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds Python's and NumPy's global RNGs: put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def mnist1d() -> tuple[TensorDataset, TensorDataset]:
    """The standard MNIST-1D split, 4000 train / 1000 test examples of length 40, generated
    offline by ``mnist1d.data.make_dataset`` with its default arguments (seed 42)."""
    d = _mnist1d_arrays()

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        # copies: editing a returned tensor in place must not change later calls
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64))

    return as_dataset(d["x"], d["y"]), as_dataset(d["x_test"], d["y_test"])


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values.")
    return array.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    folders = [root, root / "MNIST" / "raw", root / "raw", root / "MNIST"]
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    searched = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found; looked in {searched}. Nothing is downloaded: put the "
        "IDX files there (torchvision's layout ROOT/MNIST/raw/ works)."
    )


def mnist(root: str | Path = "data", train: bool = True) -> TensorDataset:
    """MNIST from its IDX files: x float32 in [0, 1] of shape (N, 1, 28, 28), y int64.

    ``root`` may hold the files directly or in torchvision's ``ROOT/MNIST/raw/`` layout;
    ``train=False`` reads the ``t10k`` (test) files.
    """
    prefix = "train" if train else "t10k"
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}.")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)
