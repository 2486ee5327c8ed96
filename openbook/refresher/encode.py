"""The one encoding loop, used by the Ray actors and by in-process (synchronous) builds alike,
so both produce the same numbers. It knows nothing of the model: an encoder is any module that maps a
token batch to vectors and says its ``dim``; how to build one is the model's encoder spec."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Protocol

import numpy as np
import torch

from openbook.data.tokcache import TokenizedCorpus


class EncoderSpec(Protocol):
    """What a refresh actor is handed (picklable): how to build the encoder, untrained; the weights
    arrive with each refresh. A model makes its own (the bi-encoder's is ``DocTowerSpec``)."""

    def build(self) -> torch.nn.Module: ...


def load_numpy_state(module: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A CPU copy of the weights as numpy arrays (zero-copy through Ray's object store). numpy has no bfloat16
    (a ``bf16-true`` trainer's weights): those go as float32, which the actors' float32 encoders load exactly."""
    return {k: cpu_copy(v).numpy() for k, v in module.state_dict().items()}


def cpu_copy(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to("cpu", dtype=torch.float32 if v.dtype == torch.bfloat16 else v.dtype, copy=True)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s weights are (its first parameter's device; CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@contextmanager
def evaluating(module: torch.nn.Module):
    """Eval mode for the block; callers in the training loop get their dropout back afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def encode_rows(encoder: torch.nn.Module, tokens: TokenizedCorpus, start: int, end: int, batch_size: int,
                device: str | torch.device | None = None) -> np.ndarray:
    """Embeddings of corpus rows [start, end) as float16 [end-start, d] (the snapshot's dtype), on ``device``
    (None: where the encoder is; a trainer's in-process build runs on its GPU)."""
    return encode_row_ids(encoder, tokens, np.arange(start, end), batch_size, device)


def _autocast(device: torch.device):
    """On cuda: bf16 (fp16 where bf16 is missing) mixed precision; on CPU: the encoder's own dtype."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@torch.inference_mode()
def encode_row_ids(encoder: torch.nn.Module, tokens: TokenizedCorpus, rows: np.ndarray, batch_size: int,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Embeddings of the given corpus rows, float16 [len(rows), d], in the rows' order, on ``device`` (None: the
    encoder's own; a device the encoder is not on is an error, not a silent copy of the ids to the wrong one).

    Batches are length-bucketed: rows are encoded shortest first, so each batch pads only to its own
    longest passage (what sentence-transformers' ``encode`` does; on varied real text, corpus order pads
    most passages to far beyond their length)."""
    rows = np.asarray(rows, dtype=np.int64)
    device = _check_device(encoder, device)
    out = np.empty((len(rows), encoder.dim), dtype=np.float16)
    order = np.argsort(np.asarray(tokens.lengths[rows]), kind="stable")
    with evaluating(encoder), _autocast(device):
        for lo in range(0, len(rows), batch_size):
            sel = order[lo:lo + batch_size]
            batch = {k: v.to(device) for k, v in tokens.batch(rows[sel]).items()}
            out[sel] = encoder(**batch).float().cpu().numpy().astype(np.float16)
    return out


def _check_device(encoder: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    own = device_of(encoder)
    if device is None:
        return own
    device = torch.device(device)
    if device.type != own.type or (device.index is not None and own.index is not None and device.index != own.index):
        raise ValueError(f"encode on {device}: the encoder's weights are on {own}")
    return own


@torch.inference_mode()
def encode_texts(encoder: torch.nn.Module, tokenizer, texts: list[str], max_length: int,
                 batch_size: int = 256) -> np.ndarray:
    """Embeddings float32 [N, d] of raw texts (questions) with ``encoder``, truncated to ``max_length`` tokens,
    on the encoder's device (a trainer's dev recall during fit runs on its GPU)."""
    chunks = []
    device = next(encoder.parameters()).device
    with evaluating(encoder):
        for lo in range(0, len(texts), batch_size):
            batch = tokenizer(texts[lo:lo + batch_size], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            chunks.append(encoder(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
