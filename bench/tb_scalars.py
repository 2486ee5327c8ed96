"""A run's TensorBoard scalars, read back by the benchmarks."""

from __future__ import annotations

from pathlib import Path


def all_scalars(tb: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar in every events file the newest process wrote into ``tb`` (validate-at-start, fit and
    the final validate each write their own file). Files of an earlier, interrupted run in the same
    directory are left out: TensorBoard would merge them in."""
    import shutil
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tb.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    newest = [f for f in files if _writer(f) == _writer(files[-1])]
    with tempfile.TemporaryDirectory() as tmp:
        for f in newest:
            shutil.copy(f, Path(tmp) / f.name)
        acc = EventAccumulator(tmp, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
                for tag in acc.Tags()["scalars"]}


def _writer(events: Path) -> list[str]:
    """The host and pid in ``events.out.tfevents.<time>.<host>.<pid>.<n>``: which process wrote the file."""
    return events.name.split(".")[4:-1]
