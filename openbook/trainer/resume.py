"""Resume keeps its settings: the recipe comes from the checkpoint's ``config.yaml``, ``--set`` goes on top,
and a change to what fixes the weights' shapes or the data order is refused before any weight is loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from openbook.config import to_dict
from openbook.errors import OpenbookError
from openbook.recipe import RecipeConfig, load_recipe
from openbook.trainer.checkpoints import CONFIG_FILE, list_checkpoints, resolve_checkpoint

log = logging.getLogger(__name__)

# Settings a resumed run must keep (a dotted key, or a section whose every key counts): the model and its
# sizes and vocabularies (the checkpoint's tensors have those shapes), and what fixes the data order.
LOCKED = ("model", "data.corpus", "data.source", "data.pydoc_words", "data.qa_train", "data.qa_dev", "data.columns",
          "data.world", "retriever.encoder", "retriever.doc_encoder", "retriever.shared", "retriever.projection_dim",
          "generator.source", "generator.d_model", "generator.layers", "generator.heads", "generator.ffn",
          "generator.max_positions", "generator.vocab", "generator.tokenizer", "realm.reader", "realm.reader_hidden",
          "realm.reader_layers", "realm.reader_heads", "realm.reader_ffn", "train.batch_size", "train.seed")


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _locked(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in LOCKED)


def check_resume(cfg: RecipeConfig, ckpt: Path) -> None:
    """Refuse (one line, naming the field and both values) a resume whose settings change a locked field."""
    saved_path = ckpt.parent / CONFIG_FILE
    if not saved_path.is_file():
        return  # a bare .ckpt file: nothing to compare against
    saved, now = flatten(yaml.safe_load(saved_path.read_text()) or {}), flatten(yaml.safe_load(_dump(cfg)))
    for key in sorted(set(saved) | set(now)):
        if _locked(key) and key in saved and saved[key] != now.get(key):
            raise OpenbookError(f"resume: {key} is {now.get(key)!r} but the checkpoint's run used {saved[key]!r} "
                                f"({saved_path}); it sets shapes or the data order, so a resumed run must keep it "
                                "(start a new run to change it)")


def _dump(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)  # as train.config_yaml writes it


def find_checkpoint(resume: str, run_dir: str | None) -> Path | None:
    """``resume``: ``last``, ``auto`` (like last, None when there is none: a fresh start), a checkpoint directory,
    a ``.ckpt`` file or a run directory (its newest checkpoint)."""
    if resume in ("last", "auto") and run_dir is None:
        raise OpenbookError(f"--resume {resume}: which run? give --config or --set run_dir=...")
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] / "model.ckpt" if found else None
    path = Path(resume)
    if path.is_dir() and not (path / "model.ckpt").exists() and (path / "checkpoints").is_dir():
        resume = "last" if list_checkpoints(path) else resume
        run_dir = str(path)
    return resolve_checkpoint(resume, run_dir)


def resume_recipe(config: str | None, overrides: list[str], resume: str) -> RecipeConfig:
    """The recipe of ``openbook train --resume``: the checkpoint's own, with ``overrides`` on top. ``config``
    (optional) names the run (its run_dir); its other values do not apply, and those that differ from the
    checkpoint's are named in a warning. ``--resume auto`` without a checkpoint starts ``config`` afresh."""
    base = load_recipe(config, overrides) if config else None
    run_dir = base.run_dir if base else _override(overrides, "run_dir")
    ckpt = find_checkpoint(resume, run_dir)
    if ckpt is None:
        log.info("--resume auto: no checkpoint under %s/checkpoints; starting the run", run_dir)
        if base is None:
            raise OpenbookError("--resume auto found no checkpoint and no --config to start from")
        return base
    saved = ckpt.parent / CONFIG_FILE
    if not saved.is_file():
        raise OpenbookError(f"--resume {resume}: {saved} is missing (a checkpoint directory holds model.ckpt and "
                            "config.yaml)")
    # run_dir/checkpoints/step-N/model.ckpt: the run is where the checkpoint is (the saved run_dir may be relative)
    here = [f"run_dir={ckpt.parent.parent.parent}"] if ckpt.parent.parent.name == "checkpoints" else []
    cfg = load_recipe(saved, [*here, *overrides, f"train.resume_from={ckpt}"])
    if base is not None:
        _warn_ignored(base, cfg)
    log.info("resuming from %s with its config.yaml%s", ckpt, f" and --set {' '.join(overrides)}" if overrides else "")
    return cfg


def _override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


def _warn_ignored(base: RecipeConfig, cfg: RecipeConfig) -> None:
    a, b = flatten(yaml.safe_load(_dump(base))), flatten(yaml.safe_load(_dump(cfg)))
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ("run_dir", "train.resume_from")]
    if differ:
        shown = ", ".join(f"{k}={a.get(k)!r} (checkpoint: {b.get(k)!r})" for k in differ[:5])
        log.warning("--resume: the run continues with its checkpoint's config.yaml; --config differs in %d value(s), "
                    "not applied: %s%s (use --set to change one)", len(differ), shown, ", ..." if len(differ) > 5
                    else "")
