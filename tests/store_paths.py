"""Where things lie inside a store, for the tests that look at its files: one place that spells the layout
(``batches/<name>/`` with ``states/<step>/params``, ``checkpoints/``, ``.pending/``, ``.claims/``, the
``zarr.json`` of every Zarr group, and the hidden ``.<name>.*`` folders a store is made in)."""

from __future__ import annotations

from pathlib import Path

METADATA = "zarr.json"  # every Zarr v3 group's own file


def metadata(store) -> Path:
    """The store's root ``zarr.json``: there once the store is made."""
    return Path(store) / METADATA


def batches(store) -> Path:
    return Path(store) / "batches"


def batch(store, name: str) -> Path:
    return batches(store) / name


def checkpoints(store) -> Path:
    return Path(store) / "checkpoints"


def pending(store) -> Path:
    """Where batches and checkpoints are written before their rename into place."""
    return Path(store) / ".pending"


def claims(store) -> Path:
    return Path(store) / ".claims"


def states_group(step: int, part: str = "params") -> str:
    """The group of a kept state inside a batch: ``xr.open_zarr(batch, group=states_group(8))``."""
    return f"states/{int(step)}/{part}"


def entries(folder) -> list[str]:
    """The names in one of the store's folders, its own ``zarr.json`` left out, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != METADATA)


def checkpoint_names(store) -> list[str]:
    return entries(checkpoints(store))


def making(store, tag: str) -> Path:
    """The hidden folder ``.<name>.<tag>`` beside ``store`` in which a process makes it (``tag`` + ``.lock``: its lock)."""
    store = Path(store)
    return store.parent / f".{store.name}.{tag}"


def being_made(store) -> list[Path]:
    """The hidden folders (and their lock files) beside ``store`` that a process making it writes first."""
    store = Path(store)
    return sorted(store.parent.glob(f".{store.name}.*"))


def debris(store) -> list[str]:
    """What a finished run must not leave: folders being written, checkpoints, claims, half-made stores."""
    left = [p for folder in (pending(store), checkpoints(store), claims(store)) for p in Path(folder).iterdir()]
    return [str(p) for p in left + being_made(store) if p.name != METADATA]


def damaged(store) -> Path:
    """Where damaged batches and checkpoints are set aside (moved, never deleted)."""
    return Path(store) / "damaged"


def batch_names(store) -> list[str]:
    """The batches' folders, oldest first."""
    return entries(batches(store))


def state_array(batch_folder, step: int, name: str, part: str = "params") -> Path:
    """The folder of one array of a kept state: ``batches/<b>/states/<step>/params/<name>``."""
    return Path(batch_folder) / states_group(step, part) / name


def metric_array(batch_folder, metric: str) -> Path:
    """The folder of one metric's array in a batch: ``batches/<b>/<metric>``."""
    return Path(batch_folder) / metric


def chunk(array_folder) -> Path:
    """The first chunk file of an array (chunk keys ``0.0.0``, beside its ``zarr.json``)."""
    return sorted(p for p in Path(array_folder).iterdir() if p.name != METADATA)[0]
