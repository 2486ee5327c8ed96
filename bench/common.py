"""Shared by the benchmarks: machine facts and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
QUICK = ROOT / "BENCHMARKS.quick.md"
OUT_ENV = "OPENBOOK_BENCHMARKS_MD"
HEADER = """# Benchmarks

Every figure below is written by a script in `bench/`; none is typed by hand. Each section names
the command that reproduces it and the machine it ran on. Ratios are measured side by side in one run.
"""


def machine() -> str:
    import faiss
    import ray
    import torch
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"faiss {faiss.__version__}, ray {ray.__version__}; {dt.date.today().isoformat()}")


def write_section(name: str, body: str, path: Path | None = None) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers of ``path``: by default
    BENCHMARKS.md, or the file named by ``$OPENBOOK_BENCHMARKS_MD`` (``python -m bench --quick`` sets it, so
    a quick check does not overwrite the full results)."""
    path = path or Path(os.environ.get(OUT_ENV, BENCHMARKS))
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
