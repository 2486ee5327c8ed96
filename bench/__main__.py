"""Run every benchmark: ``python -m bench [--quick] [--only NAME[,NAME]] [--dry-run]``.

Each benchmark runs as its own process (``python -m bench.<name>``: each starts and stops its own Ray)
and writes its own section of BENCHMARKS.md and its plots. With ``--quick`` the sections go to
BENCHMARKS.quick.md instead (not committed), so a quick check never replaces the full results. A run
of all of them also writes the "runner" section: how long each benchmark took.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import BENCHMARKS as BENCHMARKS_MD
from bench.common import OUT_ENV, QUICK, ROOT, machine, table, write_section

NAMES = ("refresh", "rag_step", "knnlm", "fid_passages", "learning", "scaling", "sharded", "ingest", "seeds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(NAMES)}")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(NAMES)})")
    args.names = [n for n in NAMES if n in names] if names else list(NAMES)  # always in the fixed order
    return args


def command(name: str, quick: bool) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]


def environment(quick: bool) -> dict[str, str]:
    return {**os.environ, OUT_ENV: str(QUICK if quick else BENCHMARKS_MD)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, failed = [], []
    for name in args.names:
        cmd = command(name, args.quick)
        print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=environment(args.quick)).returncode
        rows.append({"benchmark": name, "minutes": round((time.perf_counter() - t0) / 60, 1),
                     "status": "ok" if code == 0 else f"failed ({code})"})
        failed += [name] if code else []
    if rows:
        print(table(rows))
    if rows and not args.only and not failed:
        flag = " --quick" if args.quick else ""
        total = sum(r["minutes"] for r in rows)
        write_section("runner", path=QUICK if args.quick else BENCHMARKS_MD, body=f"""## Running them all

`python -m bench{flag}` on {machine()}: every benchmark below, one after another, each in its own process;
{total:.1f} min in all.

{table(rows)}
""")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
