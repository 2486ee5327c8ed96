"""The cluster jobs on the testbed's real stack (launch/testbed/testbed.py): a real SLURM, two hosts as network
namespaces, a real Prometheus. Marked ``testbed``; they skip, with the testbed's one line, where it cannot run
(not root, no namespaces, no packages and no apt)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENBOOK = str(Path(sys.executable).parent / "openbook")
pytestmark = [pytest.mark.testbed, pytest.mark.slow]


def _load_testbed():
    spec = importlib.util.spec_from_file_location("testbed", ROOT / "launch" / "testbed" / "testbed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tb = _load_testbed()


@pytest.fixture(scope="session")
def testbed():
    """The testbed, up (brought up here and down at the end unless it was up already)."""
    was_up = bool(tb.status().get("pids"))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/testbed/testbed.py"), "up"], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        pytest.skip(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "testbed unavailable")
    yield json.loads(proc.stdout)
    if not was_up:
        subprocess.run([sys.executable, str(ROOT / "launch/testbed/testbed.py"), "down"], timeout=300)


def promql(url: str, query: str) -> list[dict]:
    got = json.load(urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}",
                                           timeout=10))
    assert got["status"] == "success", got
    return got["data"]["result"]


def alerts(url: str, name: str, run: str) -> list[dict]:
    got = json.load(urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=10))["data"]["alerts"]
    return [a for a in got if a["labels"].get("alertname") == name and a["labels"].get("run") == run]


def wait_for(ok, what: str, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ok()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65000 and all(_free(p + i) for i in range(n)):
            return p


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def dashboard_queries(run: str) -> list[str]:
    board = json.loads((ROOT / "launch" / "grafana_dashboard.json").read_text())
    return [t["expr"].replace("$run", run) for p in board["panels"] for t in p.get("targets", [])]


def test_prometheus_scrapes_every_rank_answers_the_dashboard_and_fires_the_lag_alert(testbed, tmp_path):
    """A 2-process run whose every rank serves metrics, scraped by the testbed's Prometheus: the shipped lag rule
    fires while the index trails by more than 3 refresh intervals (swap_lag 20 over an interval of 5) and resolves
    once the schedule's interval grows (from step 150 on); every PromQL expression of the Grafana dashboard
    returns series with run and rank labels, the step gauge one per rank."""
    port, run = free_ports(2), "prom-run"
    shutil_copy_configs(tmp_path)
    sets = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu", "train.max_steps=260",
            "refresh.schedule=0-150:5,150-:1000", "refresh.swap_lag=20", "snapshots.keep=6", f"monitor.prometheus_port={port}",
            "monitor.bind_address=127.0.0.1", f"run_dir=runs/{run}", "data.world.num_passages=600",
            "refresh.start_timeout_seconds=600"]
    tb.add_targets(run, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    proc = subprocess.Popen([OPENBOOK, "train", "--config", "configs/default.yaml", "--quiet",
                             *[a for s in sets for a in ("--set", s)]], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = testbed["prometheus"]
    try:
        firing = wait_for(lambda: [a for a in alerts(url, "OpenbookIndexLag", run) if a["state"] == "firing"],
                          "OpenbookIndexLag firing", 300, proc)
        assert float(firing[0]["value"]) > 15
        for expr in dashboard_queries(run):
            series = promql(url, expr)
            assert series, expr
            assert all(s["metric"].get("run") == run and "rank" in s["metric"] for s in series), (expr, series)
        ranks = {s["metric"]["rank"] for s in promql(url, f'openbook_train_step{{run="{run}"}}')}
        assert ranks == {"0", "1"}  # every rank scraped: a stuck one would show
        wait_for(lambda: not alerts(url, "OpenbookIndexLag", run), "the lag alert resolved", 300, proc)
        assert proc.poll() is None  # resolved while the run goes on: the lag fell back under 3 intervals
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        (Path(testbed["state"]) / "targets" / f"{run}.json").unlink(missing_ok=True)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out[out.index("{"):])["steps"] == 260


def shutil_copy_configs(where: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "configs", where / "configs")


def test_the_shipped_alert_rules_pass_promtool(testbed):
    proc = subprocess.run(["promtool", "check", "rules", str(ROOT / "launch" / "prometheus_alerts.yml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "SUCCESS: 3 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_the_testbed_reports_what_runs(testbed):
    env = {**os.environ, "SLURM_CONF": testbed["slurm_conf"]}
    assert subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip() in (
        "idle", "mixed", "allocated")
    assert tb.reaches("a", testbed["hosts"]["b"]) and tb.reaches("b", testbed["hosts"]["a"])
    assert urllib.request.urlopen(f"{testbed['prometheus']}/-/ready", timeout=5).status == 200


# -- SLURM ----------------------------------------------------------------------------------------------------

# A 2-task CPU job on the default recipe: 600 passages, 4 shards refreshed every 4 steps (in use 2 later), a
# checkpoint every 4 steps, 40 steps.
SLURM_SETS = ["data.world.num_passages=600", "index.shards=4", "refresh.schedule=4", "refresh.swap_lag=2",
              "train.checkpoint_every_n_steps=4", "train.max_steps=40", "refresh.start_timeout_seconds=600"]


def slurm_env(testbed) -> dict:
    return {**os.environ, "SLURM_CONF": testbed["slurm_conf"], "PATH": f"{Path(sys.executable).parent}:"
            f"{os.environ['PATH']}"}


def job_state(testbed, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=slurm_env(testbed), capture_output=True,
                         text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def submit(testbed, wd: Path, name: str, extra: tuple[str, ...] = ()) -> str:
    """`openbook launch --target slurm` with the real sbatch; the job id."""
    proc = subprocess.run([OPENBOOK, "launch", "--config", "configs/default.yaml", "--target", "slurm",
                           "--procs-per-node", "2", "--partition", "debug", "--time", "0:30:00",
                           *[a for s in [*SLURM_SETS, f"run_dir=runs/{name}", *extra] for a in ("--set", s)]],
                          cwd=wd, env=slurm_env(testbed), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split()[-1]  # sbatch: "Submitted batch job N"


def finished(testbed, job: str, timeout: float = 600) -> dict:
    def done():
        state = job_state(testbed, job)
        return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None
    return wait_for(done, f"job {job} to end", timeout)


def run_summary(log: Path) -> dict:
    text = log.read_text()
    return json.loads(text[text.rindex('{\n  "steps"'):text.index("}", text.rindex('{\n  "steps"')) + 1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same 40 steps as one uninterrupted 2-process run (Lightning's own DDP launcher, no scheduler)."""
    wd = tmp_path_factory.mktemp("reference")
    shutil_copy_configs(wd)
    proc = subprocess.run([OPENBOOK, "train", "--config", "configs/default.yaml", "--quiet",
                           *[a for s in [*SLURM_SETS, "run_dir=runs/reference", "train.devices=2",
                                         "train.strategy=ddp", "train.accelerator=cpu"] for a in ("--set", s)]],
                          cwd=wd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd / "runs" / "reference"


def losses_and_versions(run: Path) -> tuple[dict, list]:
    from tests.test_cli import tb_scalars

    history = json.loads((run / "refresh_history_rank0.json").read_text())
    return tb_scalars(run, "train/loss"), history["versions"]


def cut_time_limit(testbed, job: str) -> None:
    """The job's --time cut to 2 minutes past its run time: SLURM's USR1 warning (``--signal=B:USR1@300``) is then
    due at its next time-limit check, the limit itself two minutes away: a job that outlives its estimate."""
    h, m, s = (int(x) for x in job_state(testbed, job)["RunTime"].split("-")[-1].split(":"))
    minutes = h * 60 + m + (s > 0) + 2
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], env=slurm_env(testbed), check=True)


@pytest.mark.parametrize("preempt", ["time-limit", "requeue"])
def test_a_slurm_job_preempted_mid_run_requeues_resumes_and_ends_as_if_uninterrupted(testbed, tmp_path,
                                                                                    uninterrupted, preempt):
    """Submitted through `openbook launch` and the real sbatch, 2 tasks with the Ray pool in the job. At step 12
    either its time limit draws near (cut with `scontrol update`; SLURM itself sends the `--signal=B:USR1@N` warning)
    or an operator requeues it (`scontrol requeue`: SIGTERM to every step): it checkpoints, exits 75, SLURM runs it
    again, it resumes by itself (`--resume auto`) and ends with every step's loss and index version equal to the
    uninterrupted run's; its summary and run lock name the job and its restart count; no lock or temporary
    checkpoint is left. The cut limit stays with the requeued job, so SLURM warns it again while it starts up: it
    requeues once more without training (it used to die of the USR1 and fail), and finishes once the limit is
    given back. Refreshes are slowed (2 s a shard; the deterministic swap keeps the losses) so that the warning,
    which SLURM sends at its next check (up to 30 s), finds the run still training."""
    shutil_copy_configs(tmp_path)
    name, port = f"slurm-{preempt}", free_ports(2)
    slow = ("refresh.inject_delay_seconds=2",) if preempt == "time-limit" else ()
    job = submit(testbed, tmp_path, name, (f"monitor.prometheus_port={port}", "monitor.bind_address=127.0.0.1", *slow))
    tb.add_targets(name, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])  # the job's two tasks, one port each
    run = tmp_path / "runs" / name
    wait_for(lambda: (run / "checkpoints" / "step-00000012").is_dir(), "a checkpoint at step 12", 600)
    scraped = wait_for(lambda: {s["metric"]["rank"] for s in promql(testbed["prometheus"],
                                                                   f'openbook_train_step{{run="{name}"}}')} or None,
                       "both tasks scraped", 60)
    assert scraped == {"0", "1"}  # Prometheus scrapes every rank of the job
    lock = json.loads((run / ".openbook.lock").read_text())
    assert lock["job"] == job and lock["restart"] in (None, "0")
    if preempt == "time-limit":
        cut_time_limit(testbed, job)
        wait_for(lambda: int(job_state(testbed, job).get("Restarts", 0)) >= 2, "a second requeue", 600)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], env=slurm_env(testbed), check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], env=slurm_env(testbed), check=True)
    state = finished(testbed, job)
    log = next((run / "slurm").glob("*.out"))
    text = log.read_text()
    restarts = int(state["Restarts"])
    assert state["JobState"] == "COMPLETED" and (restarts >= 2 if preempt == "time-limit" else restarts == 1), (
        state, text[-3000:])
    summary = run_summary(log)
    assert summary["steps"] == 40 and summary["slurm_job_id"] == job and summary["slurm_restart_count"] == restarts
    assert "preempted: checkpoint" in text and "resuming from" in text and "Traceback" not in text
    if preempt == "time-limit":  # the second attempt: stopped while starting up, requeued
        assert "USR1 outside the training loop" in text or "USR1 before training started" in text, text[-3000:]
    (loss, versions), (ref_loss, ref_versions) = losses_and_versions(run), losses_and_versions(uninterrupted)
    assert sorted(loss) == sorted(ref_loss) and len(ref_loss) == 40
    for step, value in ref_loss.items():
        assert loss[step] == pytest.approx(value, abs=1e-4), (step, loss, ref_loss)
    assert versions == ref_versions  # the history goes on across the requeues: every step's, from step 1
    assert not (run / ".openbook.lock").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written one


# -- two hosts --------------------------------------------------------------------------------------------------

TWO_HOST_SETS = ["data.world.num_passages=600", "index.shards=4", "refresh.schedule=4", "refresh.swap_lag=2",
                 "index.placement=sharded", "refresh.num_workers=2", "train.max_steps=16",
                 "refresh.start_timeout_seconds=600"]


def plan_lines(wd: Path, a_ip: str, sets: list[str]) -> dict[str, list[str]]:
    """`openbook launch --target torchrun --nodes 2` for the two hosts: {"node 0": [commands], "node 1": [...]}."""
    proc = subprocess.run([OPENBOOK, "launch", "--config", "configs/default.yaml", "--target", "torchrun", "--nodes",
                           "2", "--procs-per-node", "1", "--master-addr", a_ip, "--dry-run", "--assume-shared-fs",
                           *[a for s in sets for a in ("--set", s)]], cwd=wd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("[node "):
            where, cmd = line[1:].split("] ", 1)
            lines.setdefault(where, []).append(cmd)
    return lines


def ray_plan(wd: Path, a_ip: str, sets: list[str]) -> str:
    """`openbook launch --target ray --nodes 2`'s `ray exec` command, as run on the head: from ``wd`` (not
    ~/openbook, where `ray up` would sync the checkout), joining the head by its address, a worker of 2 CPUs per host.
    (`ray up` itself, the autoscaler's ssh to the machines, is not run: the testbed's hosts were started by hand.)"""
    proc = subprocess.run([OPENBOOK, "launch", "--config", "configs/default.yaml", "--target", "ray", "--nodes", "2",
                           "--procs-per-node", "1", "--dry-run", "--assume-shared-fs",
                           *[a for s in sets for a in ("--set", s)]], cwd=wd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exec_line = next(line for line in proc.stdout.splitlines() if line.startswith("[here] ray exec"))
    inner = shlex.split(exec_line)[-1]  # 'cd ~/openbook && .venv/bin/python launch/ray_train.py ...'
    args = inner.split("launch/ray_train.py", 1)[1].replace("--address auto", f"--address {a_ip}:6379")
    return f"{shlex.quote(sys.executable)} {ROOT / 'launch' / 'ray_train.py'}{args} --cpus-per-worker 2"


def host_env() -> dict:
    # gloo binds the interface the host's address is on; Ray's token is the one ~/.ray holds (a home all share)
    # OMP_NUM_THREADS=1 as torchrun.sh sets it (Ray would give its workers their CPU count): the same last bits
    return {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def start_ray(host: str, cmd: str, tmp: Path) -> None:
    """The plan's `ray start` line on ``host``; the hosts share this machine's /tmp, so each keeps its own temp dir
    (on a real cluster every node has its own /tmp)."""
    subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], env=host_env(),
                   capture_output=True)
    extra = f" --temp-dir={tmp}/ray-{host} --num-cpus=3" + (" --include-dashboard=false" if "--head" in cmd else "")
    # 3 CPUs a host: a Ray Train worker of 2 and an encoder actor of 1 (the short temp dir: a
    # unix socket path under it must stay below 108 bytes
    proc = subprocess.run(tb.in_host(host, "bash", "-c", cmd + extra), env=host_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def stop_ray(tmp: Path) -> None:
    """Every process left on the two hosts (their Ray nodes, agents included): `ray stop` would stop every Ray on
    the machine, the session's own among them."""
    for host in ("a", "b"):
        for pid in subprocess.run(["ip", "netns", "pids", f"obtb-{host}"], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


def raylet_of(host_tmp: Path) -> int:
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if p.name.isdigit() and "raylet" in cmd.split("\0")[0] and str(host_tmp) in cmd:
            return int(p.name)
    raise AssertionError(f"no raylet under {host_tmp}")


def train_on_both(lines: dict, wd: Path, timeout: float = 600, during=None) -> tuple[subprocess.Popen, ...]:
    procs = [subprocess.Popen(tb.in_host(h, "bash", "-c", lines[f"node {i}"][-1]), cwd=wd, env=host_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, h in enumerate("ab")]
    if during is not None:
        during()
    outs = [p.communicate(timeout=timeout) for p in procs]
    return tuple((p.returncode, out, err) for p, (out, err) in zip(procs, outs))


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The same run as 2 processes on one host: launch/torchrun.sh as on the two hosts (torchrun's environment, its
    OMP_NUM_THREADS=1 among it, changes the last bits of the encodes: Lightning's launcher is not a reference for
    it), a local Ray with two actors."""
    wd = tmp_path_factory.mktemp("one-host")
    shutil_copy_configs(wd)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc_per_node", "2", "--master_port",
                           str(free_ports(1)), "--config", "configs/default.yaml",
                           *[a for s in [*TWO_HOST_SETS, "run_dir=runs/one", "train.accelerator=cpu"]
                             for a in ("--set", s)]],
                          cwd=wd, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd / "runs" / "one"


def test_a_run_across_two_hosts_trains_as_on_one_and_outlives_a_dead_ray_node(testbed, tmp_path, one_host):
    """The torchrun plan on two hosts: the Ray head on A, a Ray worker on B joined by address, rank 0 on A and rank 1
    on B (rendezvous on A's address), one encoder actor per host (shards written on both), the index sharded over
    the ranks: every step's loss equals the one-host 2-process run's. Then B's Ray node is killed mid-refresh: the
    run goes on to its last step with the failure counted, in bounded time, and its checkpoints are whole."""
    a_ip, b_ip = testbed["hosts"]["a"], testbed["hosts"]["b"]
    shutil_copy_configs(tmp_path)
    pin = f'refresh.worker_resources=[{{"node:{a_ip}": 0.001}}, {{"node:{b_ip}": 0.001}}]'  # an actor per host
    lines = plan_lines(tmp_path, a_ip, [*TWO_HOST_SETS, pin, "run_dir=runs/two"])
    ray_tmp = Path(testbed["state"])  # short paths for Ray's sockets
    try:
        start_ray("a", lines["node 0"][0], ray_tmp)
        start_ray("b", lines["node 1"][0], ray_tmp)
        (rc0, out0, err0), (rc1, _, err1) = train_on_both(lines, tmp_path)
        assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
        run = tmp_path / "runs" / "two"
        summary = json.loads(out0[out0.index("{"):])
        assert summary["steps"] == 16 and summary["refresh_failures"] == 0
        writers = {json.loads(f.read_text())["writer"]["node_ip"]
                   for f in (run / "snapshots").glob("v*/shard-*/shard.json")}
        assert writers == {a_ip, b_ip}
        (loss, versions), (ref_loss, ref_versions) = losses_and_versions(run), losses_and_versions(one_host)
        assert versions == ref_versions and len(loss) == 16
        for step, value in ref_loss.items():
            assert loss[step] == pytest.approx(value, abs=1e-4), (step, loss, ref_loss)

        # the Ray plan on the same cluster: launch/ray_train.py (what `ray exec` runs on the head) from A, a Ray Train
        # worker of 2 CPUs on each host (ranks on both), the same encoder actors: the same losses again
        ray_run = tmp_path / "runs" / "ray"
        proc = subprocess.run(tb.in_host("a", "bash", "-c", ray_plan(tmp_path, a_ip, [*TWO_HOST_SETS, pin,
                                                                                     "run_dir=runs/ray"])),
                              cwd=tmp_path, env=host_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert '"refresh_failures": 0' in proc.stdout + proc.stderr
        hosts = {json.loads(f.read_text())["writer"]["node_ip"]
                 for f in (ray_run / "snapshots").glob("v*/shard-*/shard.json")}
        assert hosts == {a_ip, b_ip}
        (ray_loss, ray_versions) = losses_and_versions(ray_run)
        assert ray_versions == ref_versions and sorted(ray_loss) == sorted(ref_loss)
        for step, value in ref_loss.items():
            assert ray_loss[step] == pytest.approx(value, abs=1e-4), (step, ray_loss, ref_loss)

        # B's Ray node dies while a refresh runs (each shard takes >= 2 s): no hang, the failure counted
        slow = [*TWO_HOST_SETS, pin, "run_dir=runs/dying", "refresh.inject_delay_seconds=2",
                "refresh.replace_timeout_seconds=5", "train.max_steps=20", "train.checkpoint_every_n_steps=5"]
        lines = plan_lines(tmp_path, a_ip, slow)
        dying = tmp_path / "runs" / "dying"

        def kill_b():
            snaps = dying / "snapshots"
            wait_for(lambda: (snaps / "v000001").is_dir(), "the first index", 300)
            # the step-4 refresh in flight: its staging dir exists (each shard then takes >= 2 s to write)
            wait_for(lambda: any(p.name.startswith(".tmp-") for p in snaps.iterdir()), "a refresh in flight", 300)
            os.kill(raylet_of(ray_tmp / "ray-b"), 9)

        t0 = time.time()
        (rc0, out0, err0), (rc1, _, err1) = train_on_both(lines, tmp_path, timeout=900, during=kill_b)
        assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
        summary = json.loads(out0[out0.index("{"):])
        assert summary["steps"] == 20 and summary["refresh_failures"] >= 1, summary
        assert "Traceback" not in err0 and time.time() - t0 < 600
        ckpts = sorted(p.name for p in (dying / "checkpoints").iterdir())
        assert ckpts[-1] == "step-00000020" and not [c for c in ckpts if c.startswith(".")]
    finally:
        stop_ray(ray_tmp)
