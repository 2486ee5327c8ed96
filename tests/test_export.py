"""``openbook export`` (issue 18): the exported directories reload in plain transformers (and
sentence-transformers) and give the run's embeddings and generator logits; the snapshot comes along."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openbook.index import IndexSnapshot
from openbook.models.retriever import build_retriever, load_weights
from openbook.recipe import load_recipe
from openbook.trainer.train import run_train
from tests.helpers import tiny_recipe

pytestmark = pytest.mark.slow
TEXTS = ["who was born in paris", "a much longer question about a person and the year they were born in"]


def by_hand(path, texts):
    """Plain transformers, pooled and projected as openbook_tower.json says."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    spec = json.loads((path / "openbook_tower.json").read_text())
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    enc = tok([spec["prefix"] + t for t in texts], padding=True, truncation=True, max_length=spec["max_length"],
              return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    vec = states[:, 0] if spec["pooling"] == "cls" else (states * mask).sum(1) / mask.sum(1)
    if spec["projection"]:
        w = load_file(str(path / spec["projection"]))
        vec = vec @ w["linear.weight"].T + w["linear.bias"]
    return torch.nn.functional.normalize(vec, dim=-1).numpy() if spec["normalize"] else vec.numpy()


def test_export_reloads_in_plain_transformers_with_the_runs_embeddings_and_logits(tmp_path, ray_session):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSeq2SeqLM

    cfg = tiny_recipe(tmp_path, model="rag", generator={"d_model": 32, "ffn": 64, "dropout": 0.0},
                      retriever={"projection_dim": 16, "normalize": True, "query_prefix": "q: "},
                      reader={"n_docs": 2, "max_context_length": 48}, train={"max_steps": 6, "batch_size": 4},
                      refresh={"schedule": "3", "swap_lag": 1})
    run_train(cfg, progress=False)
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "openbook.cli", "export", cfg.run_dir, str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert info["encoder_step"] > 0 and (out / "snapshot").is_dir()

    # The run's towers, from its own files.
    run_cfg = load_recipe(f"{cfg.run_dir}/config.yaml", ["retriever.init_from=null"])
    model, tok = build_retriever(run_cfg.retriever)
    load_weights(model, Path(cfg.run_dir))
    model.eval()
    from openbook.trainer.pipeline import encode_queries

    want_q = encode_queries(model, tok, TEXTS, run_cfg.retriever.query_max_length)
    np.testing.assert_allclose(by_hand(out / "query_encoder", TEXTS), want_q, rtol=1e-4, atol=1e-5)
    st = SentenceTransformer(str(out / "query_encoder"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, prompt="q: "), want_q, rtol=1e-4, atol=1e-5)
    assert not np.allclose(by_hand(out / "doc_encoder", TEXTS), want_q, atol=1e-3)  # two towers, two exports

    # The exported snapshot holds the doc tower's embeddings of its encoder step (the final swap's weights
    # may be older than the final weights: compare rows with a reload of the snapshot itself).
    snap = IndexSnapshot.load(out / "snapshot")
    assert snap.encoder_step == info["encoder_step"] and snap.embeddings.shape[1] == 16

    # The generator: same logits as the run's module weights, loaded in plain transformers.
    gen = AutoModelForSeq2SeqLM.from_pretrained(out / "generator").eval()
    state = torch.load(f"{cfg.run_dir}/model.pt", map_location="cpu", weights_only=True)
    theirs = {k.split("generator.", 1)[1]: v for k, v in state.items() if k.startswith("generator.")}
    ids = torch.tensor([[5, 6, 7, 8]]) % gen.config.vocab_size
    with torch.no_grad():
        got = gen(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
        gen.load_state_dict(theirs, strict=False)
        want = gen(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    torch.testing.assert_close(got, want)
    assert (out / "generator" / "tokenizer_config.json").is_file()


def test_export_refuses_what_is_not_a_run_and_an_existing_target(tmp_path):
    from openbook.errors import OpenbookError
    from openbook.trainer.export import export_run

    with pytest.raises(OpenbookError, match="no config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(OpenbookError, match="exists"):
        export_run(tmp_path, tmp_path / "out")
