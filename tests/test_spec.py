"""The model registry: every entry is a spec; what a spec decides about the refresh."""

from __future__ import annotations

import pytest

from openbook.registry import MODELS, model_spec
from openbook.trainer.spec import ModelSpec
from tests.helpers import tiny_recipe


def test_every_registered_model_has_a_spec_that_builds():
    for name in MODELS:
        spec = model_spec(name)
        assert isinstance(spec, ModelSpec) and type(spec).build is not ModelSpec.build, name


@pytest.mark.parametrize(("model", "sections", "refreshing"), [
    ("dense_retriever", {}, True),
    ("dense_retriever", {"train": {"freeze_doc_encoder": True}}, False),  # every refresh the same index
    ("dense_retriever", {"refresh": {"strategy": "query_side"}}, False),  # the same, said by the strategy
    ("dense_retriever", {"refresh": {"strategy": "rerank"}}, True),
    ("rag", {"train": {"freeze_retriever": True}}, False),
    ("fid", {"fid": {"distill": False}}, False),  # nothing trains FiD's retriever without KD
    ("fid", {"fid": {"distill": True}}, True),
])
def test_refresh_runs_only_where_the_doc_encoder_trains(tmp_path, model, sections, refreshing):
    from openbook.trainer.train import build_parts

    extra = {"generator": {"d_model": 32, "ffn": 64}} if model in ("fid", "rag") else {}
    cfg = tiny_recipe(tmp_path, model=model, data={"world": {"num_passages": 100, "seed": 0}}, **extra, **sections)
    assert cfg.refresh.enabled
    callback = build_parts(cfg).callback
    assert callback.refreshing is refreshing and callback.cfg.enabled is refreshing
