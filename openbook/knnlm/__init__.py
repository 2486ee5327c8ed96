"""kNN-LM (Khandelwal et al. 2020): a small causal LM, a datastore of its last pre-FFN states built by
Ray actors, FAISS search, and interpolated perplexity. ``openbook knnlm --config configs/knnlm_pydoc.yaml``."""

from openbook.knnlm.config import KnnLMConfig, load_knnlm_config

__all__ = ["KnnLMConfig", "load_knnlm_config"]
