"""Checksums and manifests: a damaged batch is found, never read as numbers.

Every array of a batch or checkpoint is written with a CRC-32C of each chunk in its codec pipeline (``CODECS``:
Zarr verifies it whenever it reads the chunk, with this library or without). Once its arrays are written, the
group is sealed: its attributes get a ``manifest`` (every file of the group, with its size in bytes: a chunk that
is deleted or cut short is found without reading it, so a missing chunk is never read as Zarr's fill value) and a
``digest`` (BLAKE2b over its other attributes, learner ids and configurations included, and over every array's
``zarr.json``: edited ids or metadata are found). ``problem`` checks the manifest and the digest (cheap: file sizes
and small files); ``bad_checksum`` checks chunks' CRC-32C from their files; ``unreadable`` decodes arrays, which
checks them too (and reads groups written without checksums). A group written before
checksums existed has neither: it is read as it is (``sealed`` says which).

>>> import numpy as np, tempfile, zarr
>>> folder = Path(tempfile.mkdtemp()) / "batch"
>>> group = zarr.create_group(folder, zarr_format=3, attributes={"learner_ids": ["a", "b"]})
>>> _ = group.create_array("loss", data=np.ones((2, 3)), compressors=CODECS)
>>> seal(folder)
>>> attrs = read_attributes(folder)
>>> sealed(attrs), problem(folder, attrs), unreadable(folder)
(True, None, None)
>>> (folder / "loss" / "c" / "0" / "0").unlink()
>>> problem(folder, attrs)
'the chunk loss/c/0/0 is missing (the manifest lists it, 28 bytes)'
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

MANIFEST = "manifest"  # attribute: {path of a file inside the group: its size in bytes}, the group's zarr.json left out
DIGEST = "digest"  # attribute: BLAKE2b of the other attributes and of every array's zarr.json
METADATA = "zarr.json"
CODECS = (ZstdCodec(level=0), Crc32cCodec())  # every array's compressors: Zarr's default, then a CRC-32C per chunk


class Damaged(Exception):
    """A batch or checkpoint found damaged: ``path`` (its folder) and ``problem`` (what is wrong, in words)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


def read_attributes(folder: Path) -> dict[str, Any]:
    """A group's attributes, read from its ``zarr.json`` (``Damaged`` if the file is not a Zarr group's JSON;
    ``FileNotFoundError`` if it is gone)."""
    path = Path(folder) / METADATA
    text = path.read_bytes()
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise Damaged(folder, f"its {METADATA} is not valid JSON ({len(text)} bytes: {error})") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(meta.get("attributes", {}), dict):
        raise Damaged(folder, f"its {METADATA} is not a Zarr group's metadata")
    return dict(meta.get("attributes", {}))


def _files(folder: Path) -> dict[str, int]:
    """Every file inside ``folder`` but its own zarr.json: relative path -> size."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != METADATA:
                out[relative] = path.stat().st_size
    return dict(sorted(out.items()))


def _digest(folder: Path, attrs: dict[str, Any], manifest: dict[str, int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({k: v for k, v in attrs.items() if k != DIGEST}, sort_keys=True).encode())
    for relative in manifest:
        if relative.endswith(METADATA):
            h.update(relative.encode() + b"\0" + (folder / relative).read_bytes() + b"\0")
    return h.hexdigest()


def seal(folder: Path) -> None:
    """Write the manifest and the digest of the group at ``folder`` into its attributes (once its arrays are
    written, before it is renamed into place)."""
    group = zarr.open_group(folder, mode="r+")
    manifest = _files(folder)
    group.update_attributes({MANIFEST: manifest})
    group.update_attributes({DIGEST: _digest(folder, read_attributes(folder), manifest)})


def sealed(attrs: dict[str, Any]) -> bool:
    """Whether a group carries a manifest and a digest (groups written before they existed do not)."""
    return MANIFEST in attrs and DIGEST in attrs


def problem(folder: Path, attrs: dict[str, Any], under: str | None = None) -> str | None:
    """What is wrong with the sealed group at ``folder`` (None: nothing found, or not sealed): a file of its
    manifest missing or of another size, an array's zarr.json that is not JSON, a digest that does not match its
    attributes and metadata. ``under``: check only the files under that path (a state group), not the digest."""
    if not sealed(attrs):
        return None
    manifest = attrs[MANIFEST]
    for relative, size in manifest.items():
        if under is not None and not relative.startswith(under.rstrip("/") + "/"):
            continue
        kind = "metadata file" if relative.endswith(METADATA) else "chunk"
        try:
            found = (folder / relative).stat().st_size
            if kind == "metadata file":
                json.loads((folder / relative).read_bytes())
        except FileNotFoundError:
            return f"the {kind} {relative} is missing (the manifest lists it, {size} bytes)"
        except (ValueError, UnicodeDecodeError) as error:
            return f"{relative} is not valid JSON ({error})"
        if found != size:
            return f"the {kind} {relative} has {found} bytes, not the {size} the manifest lists (truncated or overwritten)"
    if under is not None:
        return None
    if _digest(folder, attrs, manifest) != attrs[DIGEST]:
        return ("its attributes or its arrays' metadata changed since it was written (the digest over learner_ids, "
                "configs, steps and every zarr.json does not match)")
    return None


def bad_checksum(folder: Path, attrs: dict[str, Any], keep: Callable[[str], bool] = lambda path: True) -> str | None:
    """Check the CRC-32C of every chunk of the sealed group at ``folder`` whose path ``keep`` accepts, straight from
    the files (as Zarr's ``crc32c`` codec does when decoding, without decoding): the first that fails, or None."""
    for relative in attrs.get(MANIFEST, {}):
        if relative.endswith(METADATA) or not keep(relative):
            continue
        data = (folder / relative).read_bytes()
        if np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:]:
            return f"the chunk {relative} cannot be decoded ({_cause(ValueError('checksum'))})"
    return None


def unreadable(folder: Path, keep: Callable[[str], bool] = lambda path: True, under: str | None = None) -> str | None:
    """Decode every array of the group at ``folder`` (or of its subgroup ``under``) whose path ``keep`` accepts,
    which checks each chunk's CRC-32C; what is wrong with the first that fails (naming its chunk), None if all
    decode."""
    prefix = f"{under.rstrip('/')}/" if under else ""
    try:
        group = zarr.open_group(Path(folder) / prefix, mode="r")
        members = [(prefix + p, a) for p, a in group.members(max_depth=None)
                   if isinstance(a, zarr.Array) and keep(prefix + p)]
    except Exception as error:  # any failure to open is damage, reported with its cause
        return f"the metadata of {prefix or 'its arrays'} cannot be read ({type(error).__name__}: {error})"
    for path, array in sorted(members, key=lambda m: m[0]):
        try:
            array[...]
        except Exception as error:
            return _failing_chunk(path, array, error)
    return None


def _failing_chunk(path: str, array: zarr.Array, error: Exception) -> str:
    for index in np.ndindex(*array.cdata_shape):
        try:
            array.blocks[index]
        except Exception as chunk_error:
            key = array.metadata.chunk_key_encoding.encode_chunk_key(index)
            return f"the chunk {path}/{key} cannot be decoded ({_cause(chunk_error)})"
    return f"the array {path} cannot be read ({_cause(error)})"


def _cause(error: Exception) -> str:
    text = str(error)
    if "checksum" in text.lower():
        return "its CRC-32C checksum does not match: its bytes changed"
    return f"{type(error).__name__}: {text}"
