"""A real cluster stack on one machine, for the end-to-end tests (tests/test_testbed.py) and for trying a launch.

    python launch/testbed/testbed.py up       # install what is missing, start everything (idempotent)
    python launch/testbed/testbed.py status   # what runs, as JSON (also STATE/testbed.json)
    python launch/testbed/testbed.py down     # stop everything it started, remove its state

What ``up`` brings, all as root, state under ``$OPENBOOK_TESTBED_DIR`` (default /tmp/openbook-testbed):
- munge and a SLURM controller + node daemon (Debian's slurm-wlm 22.05: proctrack/linuxproc, task/none), one
  node with this machine's CPUs, partition ``debug``; clients find it through ``SLURM_CONF`` (STATE/slurm.conf).
  A requeued job waits ``REQUEUE_WAIT`` seconds before it starts again (SLURM's cred_expire; 120 s by default);
- two hosts, ``obtb-a`` (10.77.0.2) and ``obtb-b`` (10.77.0.3): network namespaces on a private bridge
  ``obtb0`` (10.77.0.1), each with its own loopback; they share this machine's filesystem, as cluster nodes
  share one;
- Prometheus 2.42 on 127.0.0.1:9390, scraping every 1 s the targets listed in STATE/targets/*.json
  (``add_targets``), with the shipped alert rules (launch/prometheus_alerts.yml; ``for:`` cut to 5 s).

Where it cannot start (not root, no network namespaces, packages missing and no apt) it says why in one line and
exits 2; the tests that need it skip with that line. Traffic stays on loopback and the bridge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STATE = Path(os.environ.get("OPENBOOK_TESTBED_DIR", "/tmp/openbook-testbed"))
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge",
            "prometheus": "prometheus", "promtool": "prometheus", "ip": "iproute2"}
BRIDGE, SUBNET = "obtb0", "10.77.0"
HOSTS = {"a": f"{SUBNET}.2", "b": f"{SUBNET}.3"}
PROMETHEUS = "127.0.0.1:9390"
REQUEUE_WAIT = 15  # seconds a requeued job waits (SLURM's AuthInfo cred_expire)
ALERT_FOR = "5s"  # the shipped rules' `for:` in the testbed (production: as shipped)


class Unavailable(Exception):
    """The testbed cannot run here: the one line says why."""


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kw)


def preflight() -> None:
    if os.geteuid() != 0:
        raise Unavailable("testbed: needs root (SLURM daemons, network namespaces); run it as root")
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if not shutil.which(tool)})
    if missing:
        if not shutil.which("apt-get"):
            raise Unavailable(f"testbed: {', '.join(missing)} missing and no apt-get to install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if run("apt-get", "install", "-y", "-q", *missing, check=False, env=env).returncode:
            run("apt-get", "update", "-q", check=False, env=env)
            got = run("apt-get", "install", "-y", "-q", *missing, check=False, env=env)
            if got.returncode:
                raise Unavailable(f"testbed: apt-get install {' '.join(missing)} failed: "
                                  f"{(got.stderr.strip().splitlines() or ['?'])[-1]}")
    probe = "obtb-probe"
    got = run("ip", "netns", "add", probe, check=False)
    if got.returncode:
        raise Unavailable(f"testbed: cannot make network namespaces ({got.stderr.strip()})")
    run("ip", "netns", "del", probe, check=False)


# -- munge and SLURM ------------------------------------------------------------------------------------------

def start_munge() -> None:
    if run("sh", "-c", "munge -n | unmunge", check=False).returncode == 0:
        return  # already running (ours or the machine's)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    run("runuser", "-u", "munge", "--", "munged")
    _wait(lambda: run("sh", "-c", "munge -n | unmunge", check=False).returncode == 0, "munged")
    pidfile = Path("/run/munge/munged.pid")  # munged forks into the background: its pid file names the daemon
    _record("munged", int(pidfile.read_text()) if pidfile.is_file() else None)


def slurm_conf() -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024 * 0.8)
    state = STATE / "slurm"
    return "\n".join([
        "ClusterName=openbook-testbed", f"SlurmctldHost={host}", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none", f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd.pid", f"SlurmdSpoolDir={state}/spool", f"StateSaveLocation={state}/state",
        f"SlurmctldLogFile={state}/slurmctld.log", f"SlurmdLogFile={state}/slurmd.log", "SlurmUser=root",
        "ReturnToService=2", f"AuthInfo=cred_expire={REQUEUE_WAIT}", "KillWait=30", "MinJobAge=600",
        "SchedulerParameters=sched_interval=2", "SlurmctldPort=6917", "SlurmdPort=6918",
        f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def start_slurm() -> None:
    conf = STATE / "slurm.conf"
    for d in ("slurm/state", "slurm/spool"):
        (STATE / d).mkdir(parents=True, exist_ok=True)
    conf.write_text(slurm_conf())
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if not _alive("slurmctld"):
        run("slurmctld", "-f", str(conf), env=env)
        _wait(lambda: (STATE / "slurm/slurmctld.pid").is_file(), "slurmctld")
        _record("slurmctld", int((STATE / "slurm/slurmctld.pid").read_text()))
    if not _alive("slurmd"):
        run("slurmd", "-f", str(conf), env=env)
        _wait(lambda: (STATE / "slurm/slurmd.pid").is_file(), "slurmd")
        _record("slurmd", int((STATE / "slurm/slurmd.pid").read_text()))
    _wait(lambda: run("sinfo", "-h", "-o", "%T", env=env, check=False).stdout.strip() in ("idle", "mixed",
                                                                                         "allocated"),
          "the SLURM node to come up (sinfo)", 60)


# -- two hosts -----------------------------------------------------------------------------------------------

def start_hosts() -> None:
    if run("ip", "link", "show", BRIDGE, check=False).returncode:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    have = run("ip", "netns", "list").stdout
    for name, ip in HOSTS.items():
        ns, outside = f"obtb-{name}", f"obtb-{name}0"
        if ns not in have:
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", outside, "master", BRIDGE)
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "link", "set", outside, "up")
        for dev in ("lo", "eth0"):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "route", "replace", "default", "via", f"{SUBNET}.1")
        hosts_file = STATE / f"hosts-{name}"
        hosts_file.write_text(f"127.0.0.1 localhost\n{ip} host-{name}\n")
    _wait(lambda: all(reaches(n, HOSTS[other]) for n, other in (("a", "b"), ("b", "a"))),
          "the two hosts to reach each other", 20)


def reaches(host: str, ip: str, port: int = 9) -> bool:
    """Whether ``host`` gets an answer from ``ip`` (a refused connection is an answer; a timeout is not)."""
    probe = run(*in_host(host, "timeout", "2", "bash", "-c", f"echo > /dev/tcp/{ip}/{port}"), check=False)
    return probe.returncode != 124


def link(host: str, up: bool) -> None:
    """Take host's link to the bridge down (a cut cable) or up again."""
    run("ip", "link", "set", f"obtb-{host}0", "up" if up else "down")


def in_host(host: str, *cmd: str) -> list[str]:
    """A command line that runs ``cmd`` on ``host`` (its network namespace)."""
    return ["ip", "netns", "exec", f"obtb-{host}", *cmd]


# -- Prometheus ----------------------------------------------------------------------------------------------

def alert_rules() -> str:
    """The shipped rules with ``for:`` cut to ALERT_FOR, so a test sees them fire within seconds."""
    text = (ROOT / "launch" / "prometheus_alerts.yml").read_text()
    return re.sub(r"(?m)^(\s+for:\s*)\S+", rf"\g<1>{ALERT_FOR}", text)


def start_prometheus() -> None:
    (STATE / "targets").mkdir(parents=True, exist_ok=True)
    (STATE / "alerts.yml").write_text(alert_rules())
    (STATE / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(STATE / "alerts.yml")],
        "scrape_configs": [{"job_name": "openbook", "file_sd_configs": [
            {"files": [str(STATE / "targets" / "*.json")], "refresh_interval": "1s"}]}]}))
    if _alive("prometheus"):
        urllib.request.urlopen(urllib.request.Request(f"http://{PROMETHEUS}/-/reload", method="POST"), timeout=5)
        return
    log = open(STATE / "prometheus.log", "ab")
    proc = subprocess.Popen(["prometheus", f"--config.file={STATE / 'prometheus.yml'}",
                             f"--storage.tsdb.path={STATE / 'prometheus-data'}", f"--web.listen-address={PROMETHEUS}",
                             "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d"],
                            stdout=log, stderr=log, start_new_session=True)
    _record("prometheus", proc.pid)
    _wait(lambda: _ready(f"http://{PROMETHEUS}/-/ready"), "Prometheus", 60)


def add_targets(name: str, targets: list[str]) -> Path:
    """Have Prometheus scrape ``targets`` (host:port) under job ``openbook`` (picked up within a second)."""
    path = STATE / "targets" / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": targets}]))
    tmp.replace(path)
    return path


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


# -- bookkeeping ---------------------------------------------------------------------------------------------

def _record(name: str, pid: int | None) -> None:
    info = status()
    info.setdefault("pids", {})[name] = pid
    (STATE / "testbed.json").write_text(json.dumps(info, indent=1))


def _alive(name: str) -> bool:
    pid = status().get("pids", {}).get(name)
    return bool(pid) and Path(f"/proc/{pid}").exists()


def _wait(ok, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise Unavailable(f"testbed: {what} did not come up within {timeout:.0f} s (see {STATE})")


def status() -> dict:
    path = STATE / "testbed.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def up() -> dict:
    preflight()
    STATE.mkdir(parents=True, exist_ok=True)
    start_munge()
    start_slurm()
    start_hosts()
    start_prometheus()
    info = {**status(), "state": str(STATE), "slurm_conf": str(STATE / "slurm.conf"),
            "prometheus": f"http://{PROMETHEUS}", "hosts": HOSTS, "bridge": f"{SUBNET}.1",
            "requeue_wait_seconds": REQUEUE_WAIT}
    (STATE / "testbed.json").write_text(json.dumps(info, indent=1))
    return info


def down() -> None:
    pids = status().get("pids", {})
    env = {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")}
    if (STATE / "slurm.conf").is_file() and shutil.which("scancel"):
        run("scancel", "--full", "-u", "root", env=env, check=False)  # jobs first: their Ray steps too
    for name in ("prometheus", "slurmd", "slurmctld", "munged"):
        pid = pids.get(name)
        if pid and Path(f"/proc/{pid}").exists():
            _stop(pid)
    for name in HOSTS:
        run("ip", "netns", "pids", f"obtb-{name}", check=False)
        for pid in run("ip", "netns", "pids", f"obtb-{name}", check=False).stdout.split():
            _stop(int(pid))
        run("ip", "netns", "del", f"obtb-{name}", check=False)
        run("ip", "link", "del", f"obtb-{name}0", check=False)
    run("ip", "link", "del", BRIDGE, check=False)
    shutil.rmtree(STATE, ignore_errors=True)


def _stop(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, 15)
        deadline = time.time() + grace
        while time.time() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, 9)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    verb = argv[0] if argv else "status"
    try:
        if verb == "up":
            print(json.dumps(up(), indent=1))
        elif verb == "down":
            down()
        elif verb == "status":
            print(json.dumps(status(), indent=1))
        else:
            print("usage: testbed.py up|down|status", file=sys.stderr)
            return 2
    except Unavailable as e:
        print(str(e), file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"testbed: {' '.join(e.cmd)} failed: {(e.stderr or '').strip().splitlines()[-1:] or e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
