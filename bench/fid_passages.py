"""FiD on the generated world: answer EM with 1, 5 and 10 passages per question (issue 6).

Each run is `configs/fid_tiny.yaml` (FiD-KD, async refresh, the reader pretrained by
`configs/reader_pretrain_tiny.yaml`, which runs first if its generator is missing, and the retriever
trained by `configs/rag_token_tiny.yaml`, likewise) with only
`fid.n_docs` changed; the same seed, steps and data. Reported: dev EM and gold recall@n with the final
weights and the snapshot in use, and the reader's EM given the gold passage alone (the ceiling).

    python -m bench.fid_passages            # 200 steps per run
    python -m bench.fid_passages --quick    # 60 steps per run
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, table, write_section
from openbook.recipe import load_recipe
from openbook.trainer.train import run_train

READER = ROOT / "configs/reader_pretrain_tiny.yaml"
RAG = ROOT / "configs/rag_token_tiny.yaml"
FID = ROOT / "configs/fid_tiny.yaml"
PASSAGES = (1, 5, 10)


def ensure_run(config: Path, output: str) -> Path:
    """``run_dir/output`` of a recipe, training the recipe first if it is missing."""
    cfg = load_recipe(config)
    path = ROOT / cfg.run_dir / output
    if not path.exists():
        run_train(load_recipe(config, [f"run_dir={ROOT / cfg.run_dir}"]), progress=False)
    return path


def run(n_docs: int, steps: int, reader: Path, retriever: Path, tmp: Path) -> dict:
    cfg = load_recipe(FID, [f"fid.n_docs={n_docs}", f"train.max_steps={steps}", f"generator.source={reader}",
                            f"retriever.init_from={retriever}",
                            f"run_dir={tmp / f'fid{n_docs}'}", f"train.val_every_n_steps={steps}"])
    s = run_train(cfg, progress=False)
    return {"passages": n_docs, "steps": s["steps"], "dev EM at start": s["dev_em_at_start"], "dev EM": s["dev_em"],
            "dev recall@n at start": s[f"dev_recall@{n_docs}_at_start"],
            "dev recall@n (n = passages)": s[f"dev_recall@{n_docs}"],
            "reader EM on gold passage": s["dev_reader_em_gold"], "seconds": s["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps = 60 if args.quick else 200
    reader = ensure_run(READER, "generator")
    retriever = ensure_run(RAG, "retriever.pt")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, steps, reader, retriever, Path(tmp)) for n in PASSAGES]
    print(table(rows))
    cmd = "python -m bench.fid_passages" + (" --quick" if args.quick else "")
    write_section("fid_passages", f"""## FiD: answer EM vs passages per question

`{cmd}` on {machine()}. `configs/fid_tiny.yaml` (FiD-KD, async refresh, the frozen reader from
`configs/reader_pretrain_tiny.yaml`, the retriever from `configs/rag_token_tiny.yaml`), {steps} steps
per run, only `fid.n_docs` changed. Dev EM
and recall use the final weights and the snapshot in use; "reader EM on gold passage" is the reader
given the gold passage alone, the ceiling that retrieval can approach.

{table(rows)}
""")


if __name__ == "__main__":
    main()
