"""The optimiser every LightningModule uses."""

from __future__ import annotations

import torch

from openbook.trainer.config import TrainConfig


def configure_adamw(module: torch.nn.Module, cfg: TrainConfig, lr_scale: dict[str, float] | None = None):
    """AdamW with linear warm-up; ``lr_scale`` maps a parameter-name prefix to a learning-rate multiplier."""
    groups: dict[float, list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in (lr_scale or {}).items() if name.startswith(k)), 1.0)
            groups.setdefault(scale, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": cfg.lr * s} for s, ps in groups.items()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
