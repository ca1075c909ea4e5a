"""Claims on shared work: the same benchmark command started twice (one worker per core) splits its runs, and
``balora eval`` lets one run at a time write a task's files in an output folder.

A claim is a file created exclusively (``O_EXCL``) that holds the owner's pid. A worker skips a run another live
worker has claimed and comes back to it; a claim whose owner is gone (the worker died) is taken over. File locks
(``fcntl``) would free themselves on death too, but they are per open file, invisible to ``ls`` and unreliable on
network file systems; a pid file is none of that and is what a user can inspect when a sweep looks stuck.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence


def claim(path: Path) -> bool:
    """Take the work named by ``path`` (a ``.claim`` file) for this process; False if a live process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = owner_of(path)
            if owner == os.getpid():
                return True
            if owner and alive(owner):
                return False
            path.unlink(missing_ok=True)  # stale: its worker died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(path: Path) -> None:
    """Drop this process's claim (another process's claim is left alone)."""
    if owner_of(Path(path)) == os.getpid():
        Path(path).unlink(missing_ok=True)


def owner_of(path: Path) -> int:
    try:
        return int(Path(path).read_text() or 0)
    except (OSError, ValueError):
        return 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def share(tasks: Sequence[tuple[Path, Callable[[], bool], Callable[[], object]]], poll: float = 15.0) -> None:
    """Do every unfinished task of ``tasks`` — ``(claim file, done(), do())``, in order — that no other live worker
    holds, and return once all are done (waiting, every ``poll`` seconds, for those another worker is doing; a task
    whose worker died is taken over)."""
    while True:
        pending = [t for t in tasks if not t[1]()]
        if not pending:
            return
        mine = next((t for t in pending if claim(t[0])), None)
        if mine is None:
            time.sleep(poll)
            continue
        path, done, do = mine
        try:
            if not done():  # another worker may have finished it between the two looks
                do()
        finally:
            release(path)
