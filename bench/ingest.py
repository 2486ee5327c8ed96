"""Corpus ingest in bounded memory (issue 18): a DPR-style ``psgs_w100.tsv`` of 1M rows into the Arrow cache.

The TSV is made from Python's help text (100-word windows over the pydoc topics, varied titles, quoted
fields with tabs and quotes as DPR's file has them) and ingested by ``load_corpus`` in a fresh process,
whose peak resident memory (``ru_maxrss``) is the figure; beside it, in the same run, the same file read by
what a user would pick instead (``pandas.read_csv``, ``datasets.load_dataset("csv")``), and a process that
only imports the libraries (the floor). Target: openbook's peak under 500 MB.

    python -m bench.ingest              # 1,000,000 rows
    python -m bench.ingest --quick      # 50,000 rows: a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, table, write_section

PROBES = {
    "imports only (openbook.data)": "import openbook.data",
    "openbook load_corpus": "from openbook.data import load_corpus; c = load_corpus(SRC, CACHE); assert len(c) == N",
    "pandas.read_csv": "import pandas as pd, csv; d = pd.read_csv(SRC, sep='\\t', quoting=csv.QUOTE_MINIMAL, "
                       "dtype=str, keep_default_na=False); assert len(d) == N",
    "datasets.load_dataset('csv')": "import datasets; d = datasets.load_dataset('csv', data_files=SRC, delimiter='\\t', "
                                    "cache_dir=CACHE + '/hf', split='train'); assert len(d) == N",
}


def write_tsv(path: Path, rows: int) -> int:
    """``rows`` DPR-style passages (id, text, title) of 100 words from pydoc text; returns the file size."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    titles = sorted(topics)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "text", "title"])
        for i in range(rows):
            start = (i * 37) % (len(words) - 100)
            text = " ".join(words[start:start + 100])
            if i % 50 == 0:
                text = f'"{text}"\twith a tab'  # quoted fields, as in psgs_w100.tsv
            w.writerow([i + 1, text, titles[i % len(titles)]])
    return path.stat().st_size


def peak_mb(code: str, src: Path, cache: Path, rows: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``code`` run in a fresh interpreter."""
    prog = (f"import resource, time, json\nSRC, CACHE, N = {str(src)!r}, {str(cache)!r}, {rows}\n"
            f"t = time.perf_counter()\n{code}\n"
            "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t]))")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout
    mb, seconds = json.loads(out.strip().splitlines()[-1])
    return mb, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50,000 rows")
    args = ap.parse_args(argv)
    args.rows = 50_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "psgs_w100.tsv"
        size = write_tsv(src, args.rows)
        result = []
        for name, code in PROBES.items():
            mb, seconds = peak_mb(code, src, Path(tmp) / name.split()[0], args.rows)
            result.append({"reader": name, "peak RSS MB": round(mb), "seconds": round(seconds, 1)})
            print(result[-1], flush=True)
    ours = next(r for r in result if r["reader"] == "openbook load_corpus")["peak RSS MB"]
    body = f"""## Corpus ingest memory (issue 18)

`python -m bench.ingest{'' if args.rows == 1_000_000 else f' --rows {args.rows}'}` on {machine()}.
A DPR-style `psgs_w100.tsv` of {args.rows:,} rows ({size / 1e6:,.0f} MB; 100-word passages of pydoc text, a
header line, quoted fields) read in a fresh process each; peak resident memory of that process (`ru_maxrss`,
imports included). Target: openbook under 500 MB; measured {ours} MB ({'met' if ours < 500 else 'NOT met'}).

{table(result)}
"""
    print(body)
    write_section("ingest", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
