"""Read-copy-update holder of the snapshot in use: readers grab a reference, the refresher swaps it."""

from __future__ import annotations

import threading

from openbook.errors import SnapshotError
from openbook.index.snapshot import IndexSnapshot


class IndexHolder:
    """Holds the current :class:`IndexSnapshot`.

    ``get()`` is a plain attribute read (atomic in CPython), so the training loop never blocks on a
    swap; a reader keeps using the snapshot object it got until it calls ``get()`` again, and the old
    snapshot stays alive (its mmaps valid) for as long as someone references it. Swaps serialise on a
    lock so the version check and the replacement happen together.
    """

    def __init__(self, snapshot: IndexSnapshot | None = None):
        self._current = snapshot
        self._lock = threading.Lock()

    def get(self) -> IndexSnapshot | None:
        return self._current

    @property
    def version(self) -> int | None:
        snap = self._current
        return None if snap is None else snap.version

    def swap(self, new: IndexSnapshot, *, force: bool = False) -> IndexSnapshot | None:
        """Install ``new`` and return the previous snapshot (None if empty).

        Going back to an older version is refused (a late, slow load must not undo a newer swap)
        unless ``force`` (e.g. rolling back to a checkpoint's snapshot on resume).
        """
        with self._lock:
            old = self._current
            if old is not None and new.version < old.version and not force:
                raise SnapshotError(f"{new.path}: refusing to swap to snapshot v{new.version}, older than "
                                    f"v{old.version} in use (pass force=True to roll back)")
            self._current = new
            return old
