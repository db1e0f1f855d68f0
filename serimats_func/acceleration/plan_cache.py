"""Plans chosen by measurement, remembered on disk: a second run of the same chunk measures nothing.

A choice is stored under a key naming what it depends on: what is chosen (the training step's plan, the
evaluation's), the device by name (CPU model and threads, or the GPU's name), the torch version, the number
of learners and a digest of the chunk's structure (model, shapes, optimizer, hooks, precision). The file is
``$SERIMATS_CACHE/plans.json`` (default ``~/.cache/serimats_func/plans.json``), a small JSON object written
atomically (a temporary file renamed over it), so that concurrent runs never read half a file; deleting it
(``clear()``) makes the next run measure again. A file that cannot be read or written is ignored: the run
measures (or takes the default) as if there were none.

>>> key = entry_key("train", "abc123", 8, torch.device("cpu"))
>>> key.startswith("train|cpu:") and key.endswith("|N=8|abc123")
True
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "SERIMATS_CACHE"
FILE_NAME = "plans.json"
VERSION = 1


def cache_dir() -> Path:
    """``$SERIMATS_CACHE`` when set, else ``~/.cache/serimats_func``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "serimats_func")


def cache_file() -> Path:
    return cache_dir() / FILE_NAME


def device_name(device: torch.device) -> str:
    """The device as measured: ``cuda:<GPU name>``, or ``cpu:<model name> x<threads>`` (the thread count
    changes which plan is fastest)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{device.type}:{model} x{torch.get_num_threads()}"


def digest(value: Any) -> str:
    """A short, process-independent digest of ``repr(value)`` (value made of strings, numbers and tuples)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def entry_key(kind: str, structure: str, n: int, device: torch.device) -> str:
    """The key of one choice: ``kind`` ("train", "evaluate"), the device by name, torch's version, ``n``
    learners and the structure's digest."""
    return f"{kind}|{device_name(device)}|torch {torch.__version__}|N={n}|{structure}"


def read_entries(name: str = FILE_NAME) -> dict[str, dict]:
    """Every entry of the cache file ``name`` in ``cache_dir()`` ({} when it is missing or unreadable)."""
    try:
        with open(cache_dir() / name) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != VERSION or not isinstance(content.get("plans"), dict):
        return {}
    return content["plans"]


def lookup(key: str) -> dict | None:
    """The stored entry of ``key`` ({"choice": ..., and what was measured}), or None."""
    entry = read_entries().get(key)
    return entry if isinstance(entry, dict) and "choice" in entry else None


def remember(key: str, entry: dict, name: str = FILE_NAME) -> None:
    """Store ``entry`` under ``key`` in the cache file ``name`` (read, update, write to a temporary file, rename it
    over the old one)."""
    plans = read_entries(name)
    plans[key] = entry
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": VERSION, "plans": plans}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only home: the choice is kept for this process only


def clear(name: str = FILE_NAME) -> None:
    """Forget every stored choice (the next run measures again)."""
    try:
        (cache_dir() / name).unlink()
    except FileNotFoundError:
        pass
