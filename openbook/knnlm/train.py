"""Train the small LM on the training token stream: random blocks, AdamW, warm-up + cosine decay."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from openbook.errors import ConfigError
from openbook.knnlm.config import LMConfig, LMTrainConfig

log = logging.getLogger(__name__)


def lr_factor(step: int, cfg: LMTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_lm(model: nn.Module, tokens: np.ndarray, lm: LMConfig, cfg: LMTrainConfig) -> dict:
    """Train in place; returns {"steps", "seconds", "final_loss"} (loss averaged over the last 50 steps)."""
    if len(tokens) < lm.block_size + 2:
        raise ConfigError(f"training stream has {len(tokens)} tokens, fewer than lm.block_size + 2")
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(lm.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        starts = rng.integers(0, len(tokens) - lm.block_size - 1, size=cfg.batch_size)
        batch = torch.stack([data[s:s + lm.block_size + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=None).logits.log_softmax(-1)
        loss = -loss.gather(-1, batch[:, 1:, None]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("lm step %d/%d loss %.3f", step, cfg.steps, losses[-1])
    model.eval()
    return {"steps": cfg.steps, "seconds": time.perf_counter() - t0,
            "final_loss": float(np.mean(losses[-50:])) if losses else float("nan")}
