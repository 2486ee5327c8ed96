"""Which retriever weights a run has left, and their step (``openbook build-index`` and ``search`` read them).

A finished run saves ``retriever.pt`` and beside it ``weights.json``, the global step they were taken at. A
running or killed one has step checkpoints, whose ``model.ckpt`` (Lightning) holds the module's weights,
the retriever's under ``retriever.``. The run's latest weights are the newer of its final weights and its
newest checkpoint, by step; a run with neither has only the recipe's own (its seeded init, or
``retriever.init_from``), step 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from openbook.errors import ConfigError
from openbook.trainer.checkpoints import CKPT_FILE, list_checkpoints
from openbook.trainer.spec import RETRIEVER_WEIGHTS

FINAL_STEP_FILE = "weights.json"
PREFIX = "retriever."  # every model's LightningModule holds the bi-encoder as ``self.retriever``
UNKNOWN = -1  # final weights saved before their step was recorded


@dataclass(frozen=True)
class RunWeights:
    source: str  # "final", "checkpoint" or "init"
    step: int
    path: Path | None = None

    def describe(self) -> dict:
        return {"weights": self.source, "weights_step": self.step, "weights_path": self.path and str(self.path)}


INIT = RunWeights("init", 0)


def write_final_step(run_dir: Path, step: int) -> None:
    tmp = Path(run_dir) / f".{FINAL_STEP_FILE}.tmp"
    tmp.write_text(json.dumps({"step": int(step)}))
    os.replace(tmp, Path(run_dir) / FINAL_STEP_FILE)


def final_weights(run_dir: str | Path) -> RunWeights | None:
    path = Path(run_dir) / RETRIEVER_WEIGHTS
    if not path.is_file():
        return None
    try:
        step = int(json.loads((path.parent / FINAL_STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = UNKNOWN
    return RunWeights("final", step, path)


def newest_checkpoint(run_dir: str | Path) -> RunWeights | None:
    found = list_checkpoints(run_dir)
    if not found:
        return None
    return RunWeights("checkpoint", int(found[-1].name.split("-")[1]), found[-1] / CKPT_FILE)


def latest_weights(run_dir: str | Path) -> RunWeights:
    """The newer of the run's final weights and its newest checkpoint (the final ones on a tie: the same
    step); :data:`INIT` if it has neither. Final weights of unknown step are compared by file time."""
    final, ckpt = final_weights(run_dir), newest_checkpoint(run_dir)
    if final is None or ckpt is None:
        return final or ckpt or INIT
    if final.step == UNKNOWN:
        return final if final.path.stat().st_mtime >= ckpt.path.stat().st_mtime else ckpt
    return final if final.step >= ckpt.step else ckpt


def load_into(model: torch.nn.Module, weights: RunWeights) -> None:
    """Load ``weights`` into the bi-encoder ``model`` (:data:`INIT`: leave it as built); a file that does not
    fit it is a one-line :class:`ConfigError`."""
    if weights.path is None:
        return
    try:
        if weights.source == "final":
            state = torch.load(weights.path, map_location="cpu", weights_only=True)
        else:  # our own Lightning checkpoint (RNG states and all: not weights-only); mmap: skip the optimizer
            full = torch.load(weights.path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
            state = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
        model.load_state_dict(state)
    except (RuntimeError, KeyError, OSError) as e:
        raise ConfigError(f"{weights.path}: cannot load the retriever from it ({' '.join(str(e).split())[:200]})"
                          ) from None
