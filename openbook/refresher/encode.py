"""The one encoding loop, used by the Ray actors and by in-process (synchronous) builds alike,
so both produce the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from openbook.data.tokcache import TokenizedCorpus
from openbook.models.retriever import Encoder, RetrieverConfig, build_transformer


def build_doc_tower(cfg: RetrieverConfig, vocab_size: int) -> Encoder:
    """An untrained doc tower with the architecture of ``cfg``; weights are loaded afterwards."""
    return Encoder(build_transformer(cfg.encoder, vocab_size), cfg.pooling, cfg.projection_dim, cfg.normalize)


def load_numpy_state(module: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A CPU copy of the weights as numpy arrays (zero-copy through Ray's object store)."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in module.state_dict().items()}


@torch.inference_mode()
def encode_rows(encoder: Encoder, tokens: TokenizedCorpus, start: int, end: int, batch_size: int,
                device: str = "cpu") -> np.ndarray:
    """Embeddings of corpus rows [start, end) as float16 [end-start, d] (the snapshot's dtype)."""
    was_training = encoder.training
    encoder.eval()
    out = np.empty((end - start, encoder.dim), dtype=np.float16)
    try:
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            batch = {k: v.to(device) for k, v in tokens.batch(slice(lo, hi)).items()}
            out[lo - start:hi - start] = encoder(**batch).float().cpu().numpy().astype(np.float16)
    finally:
        encoder.train(was_training)  # callers in the training loop must get their dropout back
    return out
