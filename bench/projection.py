"""Paper projection: a full re-encode of a 21M-passage Wikipedia corpus on a GPU cluster, from rates
measured here. Pure arithmetic (tested against an independent recomputation); every input that was not
measured is a field of ``Assumptions`` and is printed with the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def encoder_flops(layers: int, hidden: int, tokens: float) -> float:
    """Forward FLOPs of one passage through a BERT-style encoder with a 4x feed-forward: per layer and
    token, 8h² (Q, K, V, O projections) + 16h² (feed-forward) + 4hL (attention scores and mixing)."""
    return layers * tokens * (24.0 * hidden * hidden + 4.0 * hidden * tokens)


@dataclass(kw_only=True, frozen=True)
class Assumptions:
    passages: int = 21_000_000  # DPR's Wikipedia: 100-word passages
    tokens: int = 160  # WordPieces per passage with its title (100 words ~ 130 pieces, plus title and specials)
    layers: int = 12  # BERT-base doc encoder
    hidden: int = 768
    gpu_speedup: float = 3000.0  # one GPU (A100-class, bf16) vs one CPU core of this machine, same encoder
    gpu_peak_tflops: float = 312.0  # A100 dense bf16 peak, to show what the speed-up implies
    workers: tuple[int, ...] = (8, 16, 64)  # GPUs encoding in parallel, one shard each (linear scaling)
    step_seconds: tuple[float, ...] = (0.5, 1.0)  # trainer step time
    pq_bytes: int = 64  # IVF-PQ code bytes per passage (PQ64 over 768 dims)
    hnsw_m: int = 32


@dataclass(kw_only=True)
class Projection:
    cpu_docs_per_s: float  # measured: one worker, one core
    cpu_flops_per_doc: float  # of the measured encoder at its measured mean length
    cpu_gflops: float
    target_flops_per_doc: float
    gpu_docs_per_s: float
    implied_tflops: float
    implied_mfu: float
    rows: list[dict]
    memory_gb: dict[str, float]


def project(cpu_docs_per_s: float, cpu_layers: int, cpu_hidden: int, cpu_tokens: float,
            hnsw_link_bytes: float, a: Assumptions = Assumptions()) -> Projection:
    """``cpu_*``: the measured per-worker rate and the encoder it was measured with; ``hnsw_link_bytes``:
    measured bytes per vector an HNSW index adds on top of the raw vectors (per neighbour slot)."""
    cpu_flops = encoder_flops(cpu_layers, cpu_hidden, cpu_tokens)
    target = encoder_flops(a.layers, a.hidden, a.tokens)
    gpu_rate = cpu_docs_per_s * (cpu_flops / target) * a.gpu_speedup
    rows = []
    for w in a.workers:
        seconds = a.passages / (gpu_rate * w)
        row = {"GPUs": w, "hours per re-encode": seconds / 3600}
        row.update({f"refresh interval at {s:g} s/step (steps)": seconds / s for s in a.step_seconds})
        rows.append(row)
    n, d = a.passages, a.hidden
    memory = {"Flat fp32": 4.0 * d * n / 1e9, "fp16 embeddings (snapshot)": 2.0 * d * n / 1e9,
              f"HNSW{a.hnsw_m}": (4.0 * d + hnsw_link_bytes * a.hnsw_m) * n / 1e9,
              f"IVF-PQ{a.pq_bytes} (+8-byte ids)": (a.pq_bytes + 8.0) * n / 1e9}
    implied = gpu_rate * target / 1e12
    return Projection(cpu_docs_per_s=cpu_docs_per_s, cpu_flops_per_doc=cpu_flops,
                      cpu_gflops=cpu_docs_per_s * cpu_flops / 1e9, target_flops_per_doc=target,
                      gpu_docs_per_s=gpu_rate, implied_tflops=implied, implied_mfu=implied / a.gpu_peak_tflops,
                      rows=rows, memory_gb=memory)


def describe(p: Projection, a: Assumptions = Assumptions(), source: str = "MiniLM") -> str:
    lines = ["Assumptions (not measured): " + ", ".join(f"{k} = {v}" for k, v in asdict(a).items()) + ".",
             f"- Measured: one {source} worker (one core) encodes {p.cpu_docs_per_s:.1f} passages/s, "
             f"{p.cpu_flops_per_doc / 1e9:.3f} GFLOP each at its mean length: {p.cpu_gflops:.1f} GFLOP/s.",
             f"- A BERT-base passage of {a.tokens} tokens costs {p.target_flops_per_doc / 1e9:.1f} GFLOP "
             f"({p.target_flops_per_doc / p.cpu_flops_per_doc:.0f}x). At the assumed {a.gpu_speedup:g}x GPU speed-up, "
             f"one GPU encodes {p.gpu_docs_per_s:,.0f} passages/s, i.e. {p.implied_tflops:.0f} TFLOP/s "
             f"({p.implied_mfu:.0%} of a {a.gpu_peak_tflops:g} TFLOP/s peak: the check on that assumption).",
             "- Index memory for the whole corpus: " + ", ".join(f"{k} {v:.1f} GB" for k, v in p.memory_gb.items())
             + " (HNSW's link bytes per neighbour slot as measured above)."]
    return "\n".join(lines)
