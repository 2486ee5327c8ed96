"""The causal LM (a GPT-2 of random init from a config, or any local ``AutoModelForCausalLM`` directory)
and the one encoding loop.

kNN-LM keys are the input to the last block's feed-forward sub-layer, after its layer norm (the paper's
choice; for GPT-2 the output of ``h[-1].ln_2``), captured with a forward pre-hook on that sub-layer.
Pure torch: no Ray, no files besides the model directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openbook.errors import ConfigError
from openbook.knnlm.config import LMConfig

FFN_NAMES = ("mlp", "feed_forward", "ffn", "fc1")  # the feed-forward sub-layer's name in HF decoder blocks


def build_lm(cfg: LMConfig, vocab_size: int) -> nn.Module:
    if cfg.source != "tiny":
        return load_causal_lm(cfg.source)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    gpt_cfg = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
                         resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(gpt_cfg)


def load_causal_lm(path: str) -> nn.Module:
    """A local causal-LM directory; one line naming it when it is not one."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"lm.source: {path} is not 'tiny' or a local model directory (no config.json)")
    hf_logging.set_verbosity_error()
    try:
        AutoConfig.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"lm.source: {path} does not load as a causal LM ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def key_layer(model: nn.Module) -> nn.Module:
    """The feed-forward sub-layer of the last decoder block, whose input is the kNN key (GPT-2:
    ``h[-1].mlp``, fed by ``ln_2``; Llama-style: ``layers[-1].mlp``)."""
    found = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in FFN_NAMES and name.count(".") >= 2]
    if not found:
        raise ConfigError(f"{type(model).__name__}: no feed-forward sub-layer (named {', '.join(FFN_NAMES)}) to "
                          "take kNN keys from")
    return found[-1]


def key_dim(model: nn.Module) -> int:
    return int(model.config.hidden_size)


@contextlib.contextmanager
def captured_keys(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the ``with``, every forward appends the key layer's input [B, T, d] to the yielded list."""
    out: list[torch.Tensor] = []
    handle = key_layer(model).register_forward_pre_hook(lambda _m, args: out.append(args[0].detach()))
    try:
        yield out
    finally:
        handle.remove()


def windows(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Sliding windows over a stream of ``n_tokens``, as int64 rows (start, lo, hi).

    A window feeds tokens [start, start + L) (L = min(block_size, n_tokens - 1)) and scores the
    predictions made at input positions [lo, hi): position i predicts token i + 1. Every position in
    [0, n_tokens - 1) is scored by exactly one window, with >= block_size - stride tokens of context
    except at the very start. Windows depend only on the stream, never on how they are sharded.
    """
    n_pred = n_tokens - 1
    if n_pred < 1:
        return np.zeros((0, 3), dtype=np.int64)
    length = min(block_size, n_pred)
    rows, lo, w = [], 0, 0
    while lo < n_pred:
        start = min(w * stride, n_pred - length)
        hi = start + length
        rows.append((start, lo, hi))
        lo, w = hi, w + 1
    return np.asarray(rows, dtype=np.int64)


@torch.inference_mode()
def encode(model: nn.Module, tokens: np.ndarray, wins: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys (float32 [P, d]) and the LM's log p(next token) (float64 [P]) for the positions the
    windows score, in stream order; P = sum(hi - lo)."""
    was_training = model.training
    model.eval()
    keys, logps = [], []
    try:
        with captured_keys(model) as captured:
            for b in range(0, len(wins), batch_size):
                batch = wins[b:b + batch_size]
                length = int(batch[0, 2] - batch[0, 0])
                idx = batch[:, :1] + np.arange(length + 1)  # inputs and the token after the last
                ids = torch.from_numpy(np.asarray(tokens)[idx].astype(np.int64))
                logits = model(input_ids=ids[:, :-1]).logits
                lp = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                key = captured.pop()
                for row, (start, lo, hi) in enumerate(batch):
                    keys.append(key[row, lo - start:hi - start].float().numpy())
                    logps.append(lp[row, lo - start:hi - start].numpy())
    finally:
        model.train(was_training)
    if not keys:
        return np.zeros((0, key_dim(model)), np.float32), np.zeros(0, np.float64)
    return np.concatenate(keys), np.concatenate(logps)
