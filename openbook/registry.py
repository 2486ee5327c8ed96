"""The models ``openbook train`` knows: a recipe's ``model:`` names one of them.

Each entry points at the model's spec (``openbook/trainer/spec.py``: how to build its module, its loaders,
its doc encoder for the refresher, what it saves), imported only when a run needs it, so loading and
checking a recipe stays light. Adding a model = a module + a spec class + one line here (README,
"Adding a model"). kNN-LM is not here: it trains no retriever and refreshes no index; ``openbook
knnlm`` runs it, with the same actor pool loop and index interface.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    spec: str  # "package.module:Class"
    help: str
    generates: bool = False  # a seq2seq generator writes the answer (so a closed-book baseline exists)


MODELS: dict[str, ModelEntry] = {
    "dense_retriever": ModelEntry("openbook.trainer.retrieval_module:DenseRetrievalSpec",
                                  "a bi-encoder trained on QA pairs, hard negatives from the stale index"),
    "ict": ModelEntry("openbook.trainer.ict_module:IctSpec", "the Inverse Cloze Task warm start of the retriever"),
    "realm_pretrain": ModelEntry("openbook.trainer.realm_module:RealmPretrainSpec",
                                 "REALM pretraining: salient-span masked LM marginalised over retrieved passages"),
    "realm_qa": ModelEntry("openbook.trainer.realm_qa_module:RealmQASpec",
                           "REALM open-QA fine-tuning: a span reader over retrieved passages"),
    "rag": ModelEntry("openbook.trainer.rag_module:RagSpec", "RAG-Token / RAG-Sequence", generates=True),
    "fid": ModelEntry("openbook.trainer.fid_module:FidSpec", "Fusion-in-Decoder, optionally FiD-KD", generates=True),
}


def model_names() -> str:
    return ", ".join(MODELS)


def model_spec(name: str):
    """The spec object of model ``name`` (an instance of its ``ModelSpec`` subclass)."""
    module, cls = MODELS[name].spec.split(":")
    return getattr(importlib.import_module(module), cls)()
