"""File locks that vanish with their process: claims on learners, and marks on folders being written.

A lock is ``fcntl.flock`` on a small file, taken without waiting. The kernel drops a process's locks when it
exits, however it exits (SIGKILL included), so a lock never outlives its holder and nothing needs a timeout:
a lock that can be taken is held by no live process. A holder removes its lock file before letting go, and a
taker checks that the file it locked is still the one at the path, so lock files can be deleted safely.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> mine = FileLock(folder + "/a.lock")
>>> mine.acquire(), FileLock(folder + "/a.lock").acquire()  # a second open file cannot take it
(True, False)
>>> mine.release()
>>> held(folder + "/a.lock")
False
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_SUFFIX = ".lock"


class FileLock:
    """An exclusive lock on ``path`` (made if missing), taken without waiting."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, create: bool = True) -> bool:
        """Take the lock; False if another open file holds it (or, with ``create=False``, if there is no file)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if create:
                    raise
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # its holder removed the file meanwhile: that lock is gone
            if not create:
                return False

    def release(self, remove: bool = True) -> None:
        """Let go; with ``remove``, delete the file first (nobody can hold it then). Never fails on the file: a
        lock file that cannot be removed (a lost write permission) is a free lock, which the next run removes."""
        if self._fd is None:
            return
        if remove:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def locked(self) -> bool:
        return self._fd is not None


def held(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock at ``path`` (a file nobody holds is removed)."""
    probe = FileLock(path)
    if not probe.acquire(create=False):
        return Path(path).exists()
    probe.release()
    return False


@contextmanager
def aside(final: Path, aside_path: Path) -> Iterator[Path]:
    """Build a folder at ``aside_path``, marked as being written by a lock on ``aside_path + '.lock'``, then
    rename it to ``final`` in one step. On any error the aside folder is removed; if the process dies, the
    lock goes with it and ``remove_left_behind`` recognises the folder as debris."""
    lock = FileLock(aside_path.with_name(aside_path.name + LOCK_SUFFIX))
    lock.acquire()  # a fresh name: nobody else has it
    try:
        yield aside_path
        os.rename(aside_path, final)
    finally:
        shutil.rmtree(aside_path, ignore_errors=True)
        lock.release()


def remove_left_behind(folders: Iterable[Path]) -> list[Path]:
    """Remove folders made by ``aside`` whose writer is gone (its lock is free, or it never had one), and lock
    files left without a folder. Folders being written by a live process are left alone. Returns what was
    removed."""
    removed = []
    for folder in folders:
        if folder.name.endswith(LOCK_SUFFIX):
            continue
        lock = FileLock(folder.with_name(folder.name + LOCK_SUFFIX))
        if lock.acquire(create=False):
            shutil.rmtree(folder, ignore_errors=True)
            lock.release()
            removed.append(folder)
        elif not lock.path.exists() and folder.exists():  # made by a version without marks
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def remove_free_lock_files(paths: Iterable[Path]) -> None:
    """Delete lock files that no live process holds (left by a killed process)."""
    for path in paths:
        held(path)


class Claims:
    """This process's claims on learners: one lock file per learner id in ``folder``. A learner another
    live process has claimed is not claimed here; a killed process's claims vanish with it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._locks: dict[str, FileLock] = {}

    def claim(self, ids: Iterable[str]) -> list[str]:
        """Claim every id that no other live process holds; returns the ids this process holds now, in order."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = list(dict.fromkeys(ids))
        _allow_open_files(len(self._locks) + len(ids))
        for learner_id in ids:
            if learner_id not in self._locks:
                lock = FileLock(self.folder / f"{learner_id}{LOCK_SUFFIX}")
                if lock.acquire():
                    self._locks[learner_id] = lock
        return [i for i in ids if i in self._locks]

    def release(self, ids: Iterable[str] | None = None) -> None:
        for learner_id in list(self._locks) if ids is None else ids:
            lock = self._locks.pop(learner_id, None)
            if lock is not None:
                lock.release()

    def mine(self, learner_id: str) -> bool:
        return learner_id in self._locks

    def held_elsewhere(self, learner_id: str) -> bool:
        """Whether another live process has claimed ``learner_id``."""
        return not self.mine(learner_id) and held(self.folder / f"{learner_id}{LOCK_SUFFIX}")

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            self.release()
        except Exception:
            if error is None:  # else the error that ends the block is the one to see
                raise


def _allow_open_files(count: int) -> None:
    """Raise the soft limit on open files when a large chunk needs one lock file per learner."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
