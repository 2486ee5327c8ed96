"""PNG plots for BENCHMARKS.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from bench.common import ROOT

PLOTS = ROOT / "bench" / "plots"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_panels(path: Path, title: str, panels: list[tuple[str, str, dict[str, tuple[list, list]]]],
                logx: bool = False, logy: bool = False) -> Path:
    """One row of panels; each is (y label, x label, {series name: (xs, ys)})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, xlabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log" if logx else "linear")
        ax.set_yscale("log" if logy else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def link(path: Path, alt: str) -> str:
    """Markdown image link relative to BENCHMARKS.md."""
    return f"![{alt}]({path.relative_to(ROOT).as_posix()})"
