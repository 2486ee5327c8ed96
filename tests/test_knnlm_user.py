"""kNN-LM on the user's text and LM (issue 18): a local causal-LM directory (a tiny GPT-2 saved here with a
byte-level BPE tokenizer of its own), text from a WikiText-layout file with the user's valid/test files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openbook.errors import ConfigError, CorpusError
from openbook.knnlm.config import TextConfig, load_knnlm_config
from openbook.knnlm.datastore import Datastore
from openbook.knnlm.text import read_paragraphs

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


def paragraphs(n: int, skip: int = 0) -> list[str]:
    from openbook.data.world import pydoc_text

    return [t for _, t in pydoc_text(12)][skip:skip + n]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(paragraphs(400), vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_paragraphs_from_a_wikitext_file_a_directory_and_a_datasets_dir(tmp_path):
    import datasets

    (tmp_path / "wiki.txt").write_text(" = Title = \n\nFirst paragraph here .\nstill first .\n\n\nSecond one .\n")
    assert read_paragraphs(str(tmp_path / "wiki.txt")) == [" = Title =".strip(), "First paragraph here .\nstill first .",
                                                           "Second one ."]
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(["doc zero", "doc one"]):
        (tmp_path / "docs" / f"{i}.txt").write_text(text + "\n")
    assert read_paragraphs(str(tmp_path / "docs")) == ["doc zero", "doc one"]
    datasets.Dataset.from_dict({"text": ["a b c", "d e"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_paragraphs(str(tmp_path / "ds"), min_words=3) == ["a b c"]
    with pytest.raises(CorpusError, match="nowhere not found"):
        read_paragraphs(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="go together"):
        TextConfig(valid="v.txt")


@pytest.mark.slow
def test_knnlm_with_a_local_gpt2_directory_on_the_users_text(gpt2_dir, tmp_path, ray_session):
    from transformers import GPT2LMHeadModel

    from openbook.knnlm.pipeline import run_knnlm

    for name, part in (("train.txt", paragraphs(120)), ("valid.txt", paragraphs(15, 200)),
                       ("test.txt", paragraphs(15, 300))):
        (tmp_path / name).write_text("\n\n".join(part) + "\n")
    cfg = load_knnlm_config(ROOT / "configs" / "knnlm_pydoc.yaml", [
        f"run_dir={tmp_path / 'run'}", f"lm.source={gpt2_dir}", f"text.source={tmp_path / 'train.txt'}",
        f"text.valid={tmp_path / 'valid.txt'}", f"text.test={tmp_path / 'test.txt'}", "train.steps=0",
        f"lm.block_size={BLOCK}", f"datastore.stride={BLOCK}", "datastore.num_workers=1", "knn.k=16"])
    summary = run_knnlm(cfg)
    store = Datastore.load(tmp_path / "run" / "datastore")
    assert len(store) == summary["datastore_size"] == summary["train_tokens"] - 1

    # Independent reference: the directory in plain transformers, the key from a hook on ln_2's output (the
    # library hooks the MLP's input), the LM's perplexity from its own loss over the same windows.
    from openbook.knnlm.pipeline import lm_tokenizer
    from openbook.knnlm.text import load_text

    text = load_text(cfg.text, lm_tokenizer(cfg.lm), compact=False)
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    got = []
    handle = model.transformer.h[-1].ln_2.register_forward_hook(lambda _m, _i, o: got.append(o))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(text.train[:BLOCK])[None])
    handle.remove()
    np.testing.assert_allclose(np.asarray(store.keys[:BLOCK], np.float32), got[0][0].numpy(), rtol=2e-3, atol=2e-3)
    n, nll = len(text.valid) - 1, []
    for start in sorted({min(w * BLOCK, n - BLOCK) for w in range(math.ceil(n / BLOCK))}):
        ids = torch.as_tensor(text.valid[start:start + BLOCK + 1])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0]
        nll.append(-logp.gather(-1, ids[0, 1:, None])[:, 0])
    # windows overlap only at the end: count each predicted position once (the last window's tail)
    last = n - (n // BLOCK) * BLOCK if n % BLOCK else 0
    values = torch.cat(nll[:-1] + [nll[-1][BLOCK - last:] if last else nll[-1]])
    assert len(values) == n
    assert summary["valid_ppl_lm"] == pytest.approx(math.exp(values.mean().item()), rel=1e-6)
    assert math.isfinite(summary["test_ppl_knnlm"])


def test_a_directory_that_is_not_a_causal_lm_gets_one_line(tmp_path):
    from openbook.knnlm.config import LMConfig
    from openbook.knnlm.model import build_lm

    with pytest.raises(ConfigError, match="no config.json") as err:
        build_lm(LMConfig(source=str(tmp_path)), 10)
    assert "\n" not in str(err.value)
