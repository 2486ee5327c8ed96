"""``openbook search``: ask the newest valid snapshot of a recipe a question."""

from __future__ import annotations

import logging
import shlex

from openbook.data.bundle import prepare_data
from openbook.errors import SnapshotError
from openbook.models.retriever import build_retriever
from openbook.recipe import RecipeConfig, load_recipe
from openbook.trainer.pipeline import encode_queries
from openbook.trainer.weights import RunWeights, latest_weights, load_into

log = logging.getLogger(__name__)


def build_index_command(config: str, overrides: list[str]) -> str:
    """The `openbook build-index` line for this recipe, its --set values (run_dir among them) included."""
    return " ".join(["openbook build-index --config", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides)])


def run_search(config: str, overrides: list[str], query: str, k: int) -> list[str]:
    from openbook.index import SnapshotStore

    cfg = load_recipe(config, overrides)
    snap = SnapshotStore(cfg.snapshot_dir, keep=cfg.snapshots.keep, index_cfg=cfg.index).latest()  # the recipe's nprobe etc.
    if snap is None:
        raise SnapshotError(f"{cfg.snapshot_dir}: no valid snapshot; run `{build_index_command(config, overrides)}`")
    model, tokenizer = build_retriever(cfg.retriever)
    weights = latest_weights(cfg.run_dir)  # what `openbook build-index` encodes with by default
    load_into(model, weights)
    warn_if_mismatched(cfg, build_index_command(config, overrides), snap, weights)
    corpus = prepare_data(cfg.data).corpus
    q = encode_queries(model, tokenizer, [query], cfg.retriever.query_max_length)
    rows, scores = snap.search(q, k)
    lines = [f"snapshot v{snap.version} (encoder_step {snap.encoder_step}, {snap.count} docs)"]
    for r, s in zip(rows[0], scores[0]):
        if r < 0:
            continue
        doc = corpus[int(r)]
        lines.append(f"{s:9.3f}  {doc['id']}  {doc['title']}: {doc['text']}")
    return lines


def warn_if_mismatched(cfg: RecipeConfig, rebuild: str, snap, weights: RunWeights) -> bool:
    """One warning line when the snapshot was encoded at another step than the query encoder's weights: its
    passages and the queries then come from different encoders. Not when the doc encoder never trains (its
    weights are the same at every step). ``rebuild``: the build-index command to name. Returns whether it warned."""
    from openbook.registry import model_spec

    if snap.encoder_step == weights.step or not model_spec(cfg.model).trains_doc_encoder(cfg):
        return False
    where = f" ({weights.path})" if weights.path else " (the recipe's own)"
    log.warning("snapshot v%d was encoded with the weights of step %d, the query encoder is the %s weights of step "
                "%d%s: scores mix two encoders; `%s` re-encodes with the latter",
                snap.version, snap.encoder_step, weights.source, weights.step, where, rebuild)
    return True
