"""Run every benchmark: ``python -m bench [--quick] [--only NAME[,NAME]] [--dry-run]``.

Each benchmark runs as its own process (``python -m bench.<name>``: each starts and stops its own Ray)
and writes its own section of BENCHMARKS.md and its plots. A full run without ``--only`` also writes
the "runner" section: how long each benchmark took.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import ROOT, machine, table, write_section

BENCHMARKS = ("refresh", "rag_step", "knnlm", "fid_passages", "learning", "scaling")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    args.names = [n for n in BENCHMARKS if n in names] if names else list(BENCHMARKS)  # always in the fixed order
    return args


def command(name: str, quick: bool) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, failed = [], []
    for name in args.names:
        cmd = command(name, args.quick)
        print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        rows.append({"benchmark": name, "minutes": round((time.perf_counter() - t0) / 60, 1),
                     "status": "ok" if code == 0 else f"failed ({code})"})
        failed += [name] if code else []
    if rows:
        print(table(rows))
    if rows and not args.only and not failed:
        flag = " --quick" if args.quick else ""
        total = sum(r["minutes"] for r in rows)
        write_section("runner", f"""## Running them all

`python -m bench{flag}` on {machine()}: every benchmark below, one after another, each in its own process;
{total:.1f} min in all.

{table(rows)}
""")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
