"""Checkpoints carry the refresher state; a resumed run continues exactly where it stopped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from openbook.cli import main
from openbook.index import SnapshotStore
from openbook.trainer.checkpoints import CKPT_FILE, CONFIG_FILE, list_checkpoints, resolve_checkpoint
from openbook.trainer.train import build_parts, config_yaml, fit, make_trainer, train_loader
from tests.helpers import tiny_recipe


class Steps(pl.Callback):
    """Every step's loss, by global step."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class Kill(pl.Callback):
    """Simulates a killed job: raises as step ``after + 1`` begins (the step-``after`` checkpoint is written)."""

    def __init__(self, after: int):
        self.after = after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.after:
            raise RuntimeError("killed")


def _run(cfg, resume: str | None = None):
    parts = build_parts(cfg)
    rec = Steps()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    ckpt = resolve_checkpoint(resume, cfg.run_dir) if resume else None
    fit(trainer, parts, train_loader(parts), ckpt)
    return parts, rec, trainer


def _recipe(tmp: Path, cache: Path, max_steps: int, refresh: dict, **train):
    return tiny_recipe(tmp, cache=cache, train={"max_steps": max_steps, "checkpoint_every_n_steps": 8,
                                                "seed": 3, **train}, refresh=refresh)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["max_steps", "kill"])
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, ray_session, stop):
    # Doc encoder trained, refresh every 4 steps in sync mode: each refresh is deterministic, so the losses
    # and the index version in use at every step are a function of the weights alone.
    refresh = {"schedule": "4", "mode": "sync"}
    cache = tmp_path / "cache"
    full, full_rec, _ = _run(_recipe(tmp_path / "full", cache, 16, refresh))
    if stop == "max_steps":  # the refresh due at step 8 is not triggered (last step): resume triggers it
        first, first_rec, _ = _run(_recipe(tmp_path / "cut", cache, 8, refresh))
    else:  # killed after the step-8 refresh was published, before it was swapped in: resume swaps it
        cfg = _recipe(tmp_path / "cut", cache, 16, refresh)
        first, first_rec = build_parts(cfg), Steps()
        trainer = make_trainer(cfg, [first.callback, first_rec, Kill(8)], logger=False, enable_progress_bar=False)
        with pytest.raises(RuntimeError, match="killed"):
            fit(trainer, first, train_loader(first))
    ckpt_dir = tmp_path / "cut" / "run" / "checkpoints" / "step-00000008"
    assert (ckpt_dir / CKPT_FILE).is_file() and (ckpt_dir / CONFIG_FILE).is_file()
    assert yaml.safe_load((ckpt_dir / CONFIG_FILE).read_text())["train"]["max_steps"] == (8 if stop == "max_steps"
                                                                                         else 16)
    state = torch.load(ckpt_dir / CKPT_FILE, weights_only=False)["callbacks"]["IndexRefreshCallback"]
    assert state["step"] == 8 and state["in_use"]["version"] == 2 and state["in_use"]["encoder_step"] == 4
    if stop == "max_steps":
        assert state["last_refresh_step"] == 4 and state["published"] == 1 and state["queue"] == []
    else:  # sync = a swap lag of 1: the step-8 refresh waits for step 9, with its weights kept until then
        assert state["last_refresh_step"] == 8 and state["published"] == 2
        (waiting,) = state["queue"]
        assert (waiting["published"]["version"], waiting["encoder_step"], waiting["swap_step"]) == (3, 8, 9)
        assert set(waiting["state"]) == set(first.module.retriever.doc_encoder.state_dict())
    second, second_rec, trainer = _run(_recipe(tmp_path / "cut", cache, 16, refresh), resume="last")
    assert trainer.global_step == 16
    assert sorted(second_rec.losses) == list(range(9, 17))
    resumed = {**first_rec.losses, **second_rec.losses}
    assert sorted(resumed) == sorted(full_rec.losses) == list(range(1, 17))
    for step, loss in full_rec.losses.items():
        assert loss == pytest.approx(resumed[step], abs=1e-4), (step, full_rec.losses, resumed)
    # the history goes on across the resume: the resumed run's is the uninterrupted run's, from step 1
    versions = second.callback.stats.versions
    assert versions == full.callback.stats.versions, (versions, full.callback.stats.versions)
    assert [v for _, v in versions] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    events = [(e.version, e.submitted_step, e.swapped_step) for e in second.callback.stats.events]
    assert events == [(e.version, e.submitted_step, e.swapped_step) for e in full.callback.stats.events], events
    assert len(events) == 3 and second.callback.state_dict()["published"] == 3
    # The checkpoint's snapshot was reused (no re-encode at resume): v3 is the step-8 refresh, v4 step 12.
    assert [SnapshotStore(tmp_path / "cut" / "run" / "snapshots").load(v).encoder_step for v in (3, 4)] == [8, 12]


def _no_refresh(tmp: Path, max_steps: int):
    return tiny_recipe(tmp, train={"max_steps": max_steps, "checkpoint_every_n_steps": 2, "keep_checkpoints": 2},
                       refresh={"enabled": False})


@pytest.mark.parametrize("damage", ["none", "missing", "corrupt", "replaced"])
def test_resume_reuses_the_snapshot_or_rebuilds_it(tmp_path, damage, caplog):
    _run(_no_refresh(tmp_path, 4))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]  # keep 2
    store = SnapshotStore(run / "snapshots")
    assert store.versions() == [1]
    if damage == "missing":
        shutil.rmtree(store.path(1))
    elif damage == "corrupt":
        emb = store.path(1) / "embeddings.npy"
        emb.write_bytes(emb.read_bytes()[:-16] + b"\0" * 16)
    elif damage == "replaced":  # a valid snapshot at the same path, but another index (other weights)
        import json

        from openbook.index.snapshot import SEAL, manifest_seal

        manifest = store.path(1) / "manifest.json"
        m = json.loads(manifest.read_text())
        m["encoder_step"] = 99
        m[SEAL] = manifest_seal(m)  # sealed as a publish seals it (a hand edit alone fails the seal: corrupt)
        manifest.write_text(json.dumps(m))
        assert store.load(1).encoder_step == 99
    with caplog.at_level(logging.INFO, logger="openbook.trainer.refresh_callback"):
        parts, rec, trainer = _run(_no_refresh(tmp_path, 6), resume=str(run / "checkpoints" / "step-00000004"))
    assert trainer.global_step == 6 and sorted(rec.losses) == [5, 6]
    snap = parts.holder.get()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert len(lines) == 1, lines
    if damage == "none":
        assert (snap.version, snap.encoder_step) == (1, 0) and "not re-encoded" in lines[0]
        assert SnapshotStore(run / "snapshots").versions() == [1]
    else:
        assert snap.encoder_step == 4  # rebuilt with the restored step-4 weights, published as the newest
        assert snap.version == SnapshotStore(run / "snapshots").versions()[-1] == 2  # never v1 again
        assert "rebuilding the index" in lines[0] and "\n" not in lines[0]
        assert ("another index" in lines[0]) == (damage == "replaced")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]


def test_resume_from_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    cfg = tiny_recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    for resume, expect in ((str(tmp_path / "nope"), "checkpoint not found"), ("last", "no checkpoint under")):
        assert main(["train", "--config", str(path), "--resume", resume, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("openbook: error: --resume") and expect in err and "\n" not in err, err


def test_history_goes_on_across_resumes_and_a_finished_run_is_not_resumed(tmp_path, capsys):
    import json

    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(_no_refresh(tmp_path, 4)))
    history = tmp_path / "run" / "refresh_history_rank0.json"

    def train(*extra: str) -> int:
        return main(["train", "--config", str(path), "--quiet", *extra])

    assert train() == 0
    first = history.read_text()
    assert [s for s, _ in json.loads(first)["versions"]] == [1, 2, 3, 4]
    capsys.readouterr()
    assert train("--resume", "last") == 2  # at max_steps: nothing to train
    err = capsys.readouterr().err.strip()
    assert "step 4 and train.max_steps is 4: the run is finished" in err and "\n" not in err, err
    assert history.read_text() == first  # not overwritten by an empty history
    assert train("--resume", "auto") == 0  # a requeued finished job ends cleanly
    assert "the run is finished" in capsys.readouterr().err
    assert history.read_text() == first
    assert train("--resume", "last", "--set", "train.max_steps=6") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["final_loss"] == summary["final_loss"]  # not NaN
    versions = json.loads(history.read_text())["versions"]
    assert versions == [[s, 1] for s in range(1, 7)], versions  # steps 1-4 kept, 5-6 added


class Batches(pl.Callback):
    """Every step's batch rows (which passages, and for REALM which masked labels), by global step."""

    def __init__(self):
        self.rows = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        key = "row" if "row" in batch else "source_row"
        extra = batch["labels"].clone() if "labels" in batch else batch["query"]["input_ids"].clone()
        self.rows[trainer.global_step] = (batch[key].tolist(), extra)


@pytest.mark.parametrize("model", ["ict", "realm_pretrain"])
def test_ict_and_realm_loaders_resume_mid_epoch(tmp_path, model):
    """Stopped at step 4 of 8 (an epoch is 12 batches) and resumed: the same passages, the same masked
    spans / query sentences (their draws are seeded by call counters, saved in the checkpoint) and the
    same losses as the uninterrupted run."""
    def recipe(name: str, steps: int):
        return tiny_recipe(tmp_path / name, cache=tmp_path / "cache", model=model,
                           data={"world": {"num_passages": 100, "seed": 0}},
                           reader={"n_docs": 2, "max_context_length": 48},
                           realm={"reader_hidden": 32, "reader_ffn": 64},
                           train={"max_steps": steps, "batch_size": 8, "checkpoint_every_n_steps": 4, "seed": 3},
                           refresh={"enabled": False})

    def run(cfg, resume=None):
        parts = build_parts(cfg)
        rec, seen = Steps(), Batches()
        trainer = make_trainer(cfg, [parts.callback, rec, seen], logger=False, enable_progress_bar=False)
        fit(trainer, parts, train_loader(parts),
            resolve_checkpoint(resume, cfg.run_dir) if resume else None)
        return rec.losses, seen.rows

    full_loss, full_rows = run(recipe("full", 8))
    first_loss, first_rows = run(recipe("cut", 4))
    second_loss, second_rows = run(recipe("cut", 8), resume="last")
    assert sorted(first_loss) == [1, 2, 3, 4] and sorted(second_loss) == [5, 6, 7, 8]
    rows = {**first_rows, **second_rows}
    for step in range(1, 9):
        assert rows[step][0] == full_rows[step][0], step  # same passages
        assert torch.equal(rows[step][1], full_rows[step][1]), step  # same masks / query sentences
        loss = first_loss.get(step, second_loss.get(step))
        assert loss == pytest.approx(full_loss[step], abs=1e-4), step


class InUse(pl.Callback):
    """The encoder step of the index in use at every step (what the swap plan decides)."""

    def __init__(self, holder):
        self.holder, self.steps = holder, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = self.holder.get().encoder_step


@pytest.mark.slow
@pytest.mark.parametrize("snapshots", ["kept", "lost"])
def test_resume_continues_the_deterministic_swap_plan(tmp_path, ray_session, snapshots, caplog):
    """Async refresh every 3 steps, each swapped in 5 steps later: the step-8 checkpoint holds the step-6
    refresh, not yet in use (published or still encoding when the checkpoint was written). Resumed, the run
    swaps it in at step 11 as the uninterrupted run does, with the same losses. "lost": the snapshots it
    published are deleted before resuming, so it is redone from the weights the checkpoint kept."""
    refresh = {"schedule": "3", "swap_lag": 5}

    def run(name, steps, resume=None):
        cfg = _recipe(tmp_path / name, tmp_path / "cache", steps, refresh)
        parts = build_parts(cfg)
        rec, in_use = Steps(), InUse(parts.holder)
        trainer = make_trainer(cfg, [parts.callback, rec, in_use], logger=False, enable_progress_bar=False)
        fit(trainer, parts, train_loader(parts),
            resolve_checkpoint(resume, cfg.run_dir) if resume else None)
        return rec.losses, in_use.steps

    full_loss, full_in_use = run("full", 16)
    assert list(full_in_use.values()) == [0] * 7 + [3] * 3 + [6] * 3 + [9] * 3  # the plan: s + 5
    first_loss, first_in_use = run("cut", 8)
    state = torch.load(tmp_path / "cut" / "run" / "checkpoints" / "step-00000008" / CKPT_FILE,
                       weights_only=False)["callbacks"]["IndexRefreshCallback"]
    (waiting,) = state["queue"]
    assert (waiting["encoder_step"], waiting["swap_step"]) == (6, 11) and waiting["state"]
    store = SnapshotStore(tmp_path / "cut" / "run" / "snapshots")
    if snapshots == "lost":
        for v in store.versions():
            if store.load(v).encoder_step == 6:
                shutil.rmtree(store.path(v))
    with caplog.at_level(logging.INFO, logger="openbook.trainer.refresh_callback"):
        second_loss, second_in_use = run("cut", 16, resume="last")
    if snapshots == "lost":
        assert any("redoing the refresh of step 6" in r.getMessage() for r in caplog.records)
    assert {**first_in_use, **second_in_use} == full_in_use
    resumed = {**first_loss, **second_loss}
    assert sorted(resumed) == list(range(1, 17))
    for step, loss in full_loss.items():
        assert loss == pytest.approx(resumed[step], abs=1e-4), step


def test_resume_takes_the_recipes_search_params_and_reports_a_changed_schedule(tmp_path, ray_session, caplog):
    """Search parameters come from the recipe at every load, a resumed run's too (the manifest holds those the
    index was built with); a refresh schedule other than the checkpoint's is named at resume."""
    from openbook.recipe import load_recipe

    cfg = tiny_recipe(tmp_path, index={"factory": "IVF16,Flat", "nprobe": 2},
                      train={"max_steps": 2, "checkpoint_every_n_steps": 2}, refresh={"schedule": "100"})
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    first, _, _ = _run(load_recipe(path))
    assert first.holder.get().index.search_params == {"nprobe": 2}
    with caplog.at_level(logging.WARNING, logger="openbook.trainer.refresh_callback"):
        second, _, _ = _run(load_recipe(path, ["train.max_steps=4", "index.nprobe=7", "refresh.schedule=50"]),
                            resume="last")
    assert second.holder.get().version == 1  # the checkpoint's snapshot, not re-encoded ...
    assert second.holder.get().index.search_params == {"nprobe": 7}  # ... searched as the recipe says now
    (line,) = [r.getMessage() for r in caplog.records if "schedule" in r.getMessage()]
    assert "refresh.schedule is '50', the checkpoint's run used '100'" in line
