"""``openbook report RUN_DIR``: one PNG with a run's loss, retrieval recall and refresh lag over steps.

Reads the TensorBoard events ``openbook train`` writes to ``RUN_DIR/tb`` and the per-rank refresh
history (``refresh_history_rank0.json``). Imports matplotlib and tensorboard only when called.
"""

from __future__ import annotations

import json
from pathlib import Path

from openbook.errors import OpenbookError

Series = tuple[list[int], list[float]]


def load_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar tag of the newest events file under ``run_dir`` (a re-run in the same directory
    writes a new file; mixing them would interleave two runs)."""
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(files[-1]), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def load_history(run_dir: Path) -> dict | None:
    path = run_dir / "refresh_history_rank0.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OpenbookError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def lag_from_history(history: dict) -> Series:
    """Refresh lag in steps from the version in use at each step (a run logged without TensorBoard).
    The first snapshot is built from the step-0 weights."""
    encoder_step = {e["version"]: e["submitted_step"] for e in history.get("events", [])}
    steps = [s for s, _ in history["versions"]]
    return steps, [float(s - encoder_step.get(v, 0)) for s, v in history["versions"]]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise OpenbookError(f"{run}: not a directory")
    scalars, history = load_scalars(run), load_history(run)
    if not scalars and history is None:
        raise OpenbookError(f"{run}: no TensorBoard events (tb/events.out.tfevents.*) and no "
                            "refresh_history_rank0.json; is this an `openbook train` run directory?")
    if "index/lag_steps" not in scalars and history is not None:
        scalars["index/lag_steps"] = lag_from_history(history)
    if history is not None and "index/version" not in scalars:
        versions = history["versions"]
        scalars["index/version"] = ([s for s, _ in versions], [float(v) for _, v in versions])
    panels = {
        "loss": sorted(t for t in scalars if "loss" in t),
        "retrieval recall": sorted(t for t in scalars if "recall" in t),
        "refresh lag (steps)": [t for t in ("index/lag_steps",) if t in scalars],
    }
    path = Path(out) if out else run / "report.png"
    _plot(scalars, panels, path, run.name)
    steps = [s for tag in scalars for s in scalars[tag][0]]
    return {"report": str(path), "last_step": max(steps, default=0),
            "plotted": [t for tags in panels.values() for t in tags]}


def _plot(scalars: dict[str, Series], panels: dict[str, list[str]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise OpenbookError("openbook report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True)
    for ax, (name, tags) in zip(axes, panels.items()):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        for tag in tags:
            ax.plot(*scalars[tag], label=tag, marker="." if len(scalars[tag][0]) < 30 else None)
        if not tags:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
        elif name.startswith("refresh") and "index/version" in scalars:
            twin = ax.twinx()  # the version in use explains the lag's saw-tooth: it drops at each swap
            twin.step(*scalars["index/version"], where="post", color="tab:gray", alpha=0.6,
                      label="index/version")
            twin.set_ylabel("index version")
            twin.yaxis.set_major_locator(MaxNLocator(integer=True))
            twin.legend(loc="upper right", fontsize=8)
        if tags:
            ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("global step")
    fig.suptitle(f"openbook run: {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
