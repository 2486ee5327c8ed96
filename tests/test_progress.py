"""Long work says how far it is: world generation logs its counts (and draws a bar when asked)."""

from __future__ import annotations

import logging

import pytest

from openbook.progress import Progress


def messages(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.INFO]


def test_progress_logs_counts_and_the_rate_unit(caplog):
    log = logging.getLogger("tests.progress")
    caplog.set_level(logging.INFO, logger="tests.progress")
    with Progress(log, "job", 3, "shard", rate_unit="token", every=0.0) as prog:  # every=0: a line per update
        for _ in range(3):
            prog.update(1, 10)
    lines = messages(caplog, "tests.progress")
    assert lines[0] == "job: 3 shards to do"
    assert [line.split(" (")[0] for line in lines[1:4]] == [f"job: {i}/3 shards, {10 * i} tokens" for i in (1, 2, 3)]
    assert lines[4].startswith("job: 3/3 shards, 30 tokens in ") and lines[4].endswith(" tokens/s)")
    caplog.clear()
    with pytest.raises(RuntimeError), Progress(log, "job", 2, "shard", every=1e9) as prog:
        prog.update(1)
        raise RuntimeError("boom")
    assert messages(caplog, "tests.progress") == ["job: 2 shards to do"]  # no "done" line for a failed job


def test_world_generation_logs_its_counts_and_draws_a_bar(tmp_path, caplog, capsys):
    from openbook.data.world import WorldConfig, generate_world

    caplog.set_level(logging.INFO, logger="openbook.data.world")
    generate_world(WorldConfig(num_passages=300, seed=0), tmp_path / "w", progress=True)
    lines = messages(caplog, "openbook.data.world")
    assert lines[0] == "world: passages and questions: 300 passages to do"
    assert any(line.startswith("world: passages and questions: 300/300 passages in ") for line in lines)
    assert lines[-1].startswith(f"world: wrote 300 passages and 240/30/30 train/dev/test questions to {tmp_path / 'w'}")
    assert "300/300" in capsys.readouterr().err  # tqdm writes to stderr
    caplog.clear()
    generate_world(WorldConfig(num_passages=300, seed=0), tmp_path / "w")
    assert messages(caplog, "openbook.data.world") == [f"world: reusing {tmp_path / 'w'} (300 passages, seed 0)"]
    assert capsys.readouterr().err == ""  # no bar unless asked
