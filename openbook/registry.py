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

# The recipe sections only some models read; every model reads the others (data, retriever, index, snapshots,
# encode, train, refresh, monitor). Each entry names those of these it reads: a recipe that sets another one
# is warned that it is ignored (openbook/recipe.py).
MODEL_SECTIONS = ("reader", "generator", "rag", "fid", "realm", "ict")


@dataclass(frozen=True)
class ModelEntry:
    spec: str  # "package.module:Class"
    help: str
    generates: bool = False  # a seq2seq generator writes the answer (so a closed-book baseline exists)
    sections: tuple[str, ...] = ()  # which of MODEL_SECTIONS its spec and module read

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(MODEL_SECTIONS)
        if unknown:
            raise ValueError(f"{self.spec}: sections {sorted(unknown)} are not among {MODEL_SECTIONS}")

    def unused_sections(self) -> tuple[str, ...]:
        """The model-specific sections this model never reads."""
        return tuple(s for s in MODEL_SECTIONS if s not in self.sections)


MODELS: dict[str, ModelEntry] = {
    # sections=(): its QA batches carry answer labels cut at reader.max_answer_length, but nothing reads them
    "dense_retriever": ModelEntry("openbook.trainer.retrieval_module:DenseRetrievalSpec",
                                  "a bi-encoder trained on QA pairs, hard negatives from the stale index"),
    "ict": ModelEntry("openbook.trainer.ict_module:IctSpec", "the Inverse Cloze Task warm start of the retriever",
                      sections=("ict",)),
    "realm_pretrain": ModelEntry("openbook.trainer.realm_module:RealmPretrainSpec",
                                 "REALM pretraining: salient-span masked LM marginalised over retrieved passages",
                                 sections=("reader", "realm")),
    "realm_qa": ModelEntry("openbook.trainer.realm_qa_module:RealmQASpec",
                           "REALM open-QA fine-tuning: a span reader over retrieved passages",
                           sections=("reader", "realm")),
    "rag": ModelEntry("openbook.trainer.rag_module:RagSpec", "RAG-Token / RAG-Sequence", generates=True,
                      sections=("reader", "generator", "rag")),
    "fid": ModelEntry("openbook.trainer.fid_module:FidSpec", "Fusion-in-Decoder, optionally FiD-KD", generates=True,
                      sections=("reader", "generator", "fid")),
}


def model_names() -> str:
    return ", ".join(MODELS)


def model_spec(name: str):
    """The spec object of model ``name`` (an instance of its ``ModelSpec`` subclass)."""
    module, cls = MODELS[name].spec.split(":")
    return getattr(importlib.import_module(module), cls)()
