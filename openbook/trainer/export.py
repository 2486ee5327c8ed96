"""``openbook export RUN_DIR OUT``: a finished run as directories plain ``transformers`` (and
sentence-transformers) load, and its final snapshot.

Layout of ``OUT``:
- ``query_encoder/``, ``doc_encoder/``: ``save_pretrained`` of each tower's transformer with the tokenizer,
  and the sentence-transformers modules around it (``modules.json``, ``1_Pooling``, ``2_Dense`` when the
  retriever has a projection, ``3_Normalize`` when it normalises), so ``SentenceTransformer(dir)`` embeds as
  the run did. ``openbook_tower.json`` says the same for a user pooling by hand (pooling, projection file,
  normalisation, prefix, max length).
- ``generator/`` (RAG, FiD): the run's generator directory with its tokenizer; a compact-vocabulary
  generator keeps ``vocab.json`` (the tokenizer id of each of its ids).
- ``snapshot/``: the newest published snapshot (manifest and shards, checked before the copy).
- ``export.json``: the run, the snapshot's version and encoder step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from openbook.errors import OpenbookError
from openbook.models.retriever import Encoder, build_retriever, load_weights
from openbook.recipe import RecipeConfig, load_recipe

POOLING_MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}


def export_run(run_dir: Path, out: Path) -> dict:
    """Write ``out`` (which must not exist yet) from ``run_dir``; returns what export.json holds."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise OpenbookError(f"{run_dir}: no config.yaml (not a finished openbook run)")
    if out.exists():
        raise OpenbookError(f"{out}: exists; export writes a new directory")
    cfg = load_recipe(run_dir / "config.yaml", ["retriever.init_from=null"])
    model, tokenizer = build_retriever(cfg.retriever)
    load_weights(model, run_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    r = cfg.retriever
    write_tower(model.query_encoder, tokenizer, tmp / "query_encoder", r.query_prefix, r.query_max_length)
    write_tower(model.doc_encoder, tokenizer, tmp / "doc_encoder", r.passage_prefix, r.doc_max_length)
    if (run_dir / "generator").is_dir():
        shutil.copytree(run_dir / "generator", tmp / "generator")
        tokenizer.save_pretrained(tmp / "generator")
    info = {"run_dir": str(run_dir.resolve()), "recipe": cfg.name, "model": cfg.model, **copy_snapshot(cfg, tmp)}
    shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    tmp.replace(out)
    return info


def write_tower(tower: Encoder, tokenizer, path: Path, prefix: str, max_length: int) -> None:
    """One tower as a Hugging Face directory with sentence-transformers modules (see the module doc)."""
    tower.transformer.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "openbook_tower.json").write_text(json.dumps({
        "pooling": tower.pooling, "normalize": tower.normalize, "prefix": prefix, "max_length": max_length,
        "projection": "2_Dense/model.safetensors" if tower.proj is not None else None}, indent=1))
    if tower.pooling == "pooler":  # the model's own pooled output (DPR): no sentence-transformers Pooling module
        if tower.proj is not None:
            _module(path, [], "2_Dense", "Dense", None)
            _save_projection(tower, path / "2_Dense")
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    hidden = tower.proj.in_features if tower.proj is not None else tower.dim
    _module(path, modules, "1_Pooling", "Pooling", {"word_embedding_dimension": hidden,
                                                    **{v: k == tower.pooling for k, v in POOLING_MODES.items()}})
    if tower.proj is not None:
        dense = _module(path, modules, "2_Dense", "Dense", {
            "in_features": tower.proj.in_features, "out_features": tower.proj.out_features, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"})
        _save_projection(tower, dense)
    if tower.normalize:
        _module(path, modules, "3_Normalize", "Normalize", None)
    (path / "modules.json").write_text(json.dumps(modules, indent=1))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                "do_lower_case": False}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": prefix} if prefix
                                                                        else {}, "default_prompt_name": None,
                                                                        "similarity_fn_name": "dot"}))


def _save_projection(tower: Encoder, where: Path) -> None:
    from safetensors.torch import save_file

    save_file({"linear.weight": tower.proj.weight.detach().contiguous(),
               "linear.bias": tower.proj.bias.detach().contiguous()}, str(where / "model.safetensors"))


def _module(root: Path, modules: list, name: str, kind: str, config: dict | None) -> Path:
    (root / name).mkdir()
    if config is not None:
        (root / name / "config.json").write_text(json.dumps(config, indent=1))
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": name,
                    "type": f"sentence_transformers.models.{kind}"})
    return root / name


def copy_snapshot(cfg: RecipeConfig, out: Path) -> dict:
    """The newest snapshot that loads and verifies, copied to ``out/snapshot``."""
    from openbook.index import SnapshotStore

    snap = SnapshotStore(cfg.snapshot_dir).latest() if Path(cfg.snapshot_dir).is_dir() else None
    if snap is None:
        return {"snapshot": None}
    shutil.copytree(snap.path, out / "snapshot")
    return {"snapshot": "snapshot", "snapshot_version": snap.path.name, "encoder_step": snap.encoder_step}
