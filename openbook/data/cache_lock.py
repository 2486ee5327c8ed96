"""One process at a time prepares a data cache directory.

The DDP ranks of a run (and several runs sharing ``data.cache_dir``) all start by preparing the same data: the
generated world, the corpus's Arrow copy, its token caches. Each of those is written under a temporary name and
renamed, so racing writers never leave a broken cache, but every rank would do the whole corpus's work at once.
Under this lock the first process prepares and the others wait, then find everything cached.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = ".prepare.lock"


@contextmanager
def cache_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold ``cache_dir``'s preparation lock (an flock: released if the holder dies). A filesystem that refuses
    locks (some network filesystems) runs unlocked, as before."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as f:
        locked = _lock(f, root)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _lock(f, root: Path) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        log.info("%s: another process is preparing this data cache; waiting for it", root)
    except OSError as e:
        log.debug("%s: no file lock here (%s); preparing without one", root, e)
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        return True
    except OSError:
        return False
