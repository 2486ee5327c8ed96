"""The small causal LM (GPT-2 architecture, random init from a config) and the one encoding loop.

kNN-LM keys are the input to the last block's feed-forward sub-layer after its layer norm (for
GPT-2: the output of ``h[-1].ln_2``), captured with a forward hook. Pure torch: no Ray, no files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from openbook.knnlm.config import LMConfig


def build_lm(cfg: LMConfig, vocab_size: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    gpt_cfg = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
                         resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(gpt_cfg)


def key_layer(model: nn.Module) -> nn.Module:
    """The layer norm whose output is the kNN key: the last block's pre-FFN ``ln_2``."""
    return model.transformer.h[-1].ln_2


@contextlib.contextmanager
def captured_keys(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the ``with``, every forward appends the key layer's output [B, T, d] to the yielded list."""
    out: list[torch.Tensor] = []
    handle = key_layer(model).register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
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
        return np.zeros((0, key_layer(model).normalized_shape[0]), np.float32), np.zeros(0, np.float64)
    return np.concatenate(keys), np.concatenate(logps)
