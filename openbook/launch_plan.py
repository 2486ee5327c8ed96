"""``openbook launch``: resolve a recipe and a cluster shape into the commands that train it there.

The launch material itself lives in ``launch/`` (sbatch template, Ray cluster YAML, Ray Train entry
point, torchrun script; an installed wheel carries a copy, see openbook.resources); this module fills in
the values and says what to run where.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from openbook.errors import OpenbookError


def launch_dir() -> Path:
    from openbook.resources import resource_dir

    return resource_dir("launch")
TARGETS = ("slurm", "ray", "torchrun")
RAY_PORT = 6379
SIGNAL_SECONDS = 300  # SLURM warns the job this long before its time limit: time for one step and a checkpoint


@dataclass(frozen=True, kw_only=True)
class LaunchRequest:
    config: str
    target: str
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU processes
    procs_per_node: int | None = None  # trainer processes per node; one per GPU by default, GPUs beyond go to the pool
    overrides: tuple[str, ...] = ()
    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int | None = None  # SLURM: None leaves the cluster's default (one CPU per task, usually)
    signal_seconds: int = SIGNAL_SECONDS  # SLURM: USR1 this long before the time limit
    master_addr: str | None = None
    master_port: int = 29500
    assume_shared_fs: bool = False  # skip the check that the run dir is on a filesystem every node sees

    @property
    def procs(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    @property
    def pool_gpus(self) -> int:
        """GPUs per node left to the refresh pool's Ray node: those after the trainers' (rank r trains on GPU r)."""
        return self.gpus_per_node - self.procs if self.gpus_per_node else 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise OpenbookError(f"launch: unknown target {self.target!r} (one of {', '.join(TARGETS)})")
        if self.cpus_per_task is not None and self.cpus_per_task < 1 or self.signal_seconds < 1:
            raise OpenbookError("launch: --cpus-per-task and --signal-seconds must be >= 1")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.procs < 1:
            raise OpenbookError("launch: --nodes and processes per node must be >= 1, --gpus-per-node >= 0")
        if self.gpus_per_node and self.procs > self.gpus_per_node:
            raise OpenbookError(f"launch: one process per GPU at most: --procs-per-node {self.procs} "
                                f"> --gpus-per-node {self.gpus_per_node}")
        clash = [o for o in self.overrides if o.split("=")[0] in ("train.devices", "train.num_nodes")]
        if clash:
            raise OpenbookError(f"launch: {clash[0]!r}: set devices and nodes with --gpus-per-node / --nodes")


@dataclass
class LaunchPlan:
    target: str
    steps: list[tuple[str, str]]  # (where, shell command): "here" runs from this machine, in order
    files: dict[str, str] = field(default_factory=dict)  # rendered files, written before the steps run
    problems: list[str] = field(default_factory=list)  # a real launch refuses to start with any of these

    def render(self) -> str:
        out = [f"# openbook launch plan: {self.target}"] + [f"# PROBLEM: {p}" for p in self.problems]
        for path, text in self.files.items():
            out += [f"# --- {path} ---", text.rstrip(), "# --- end ---"]
        out += [f"[{where}] {cmd}" for where, cmd in self.steps]
        return "\n".join(out) + "\n"


def train_overrides(req: LaunchRequest) -> list[str]:
    """The Lightning settings that must match the launcher (one process per device), then the user's."""
    world = req.nodes * req.procs
    sets = [f"train.devices={req.procs}", f"train.num_nodes={req.nodes}",
            f"train.accelerator={'gpu' if req.gpus_per_node else 'cpu'}"]
    return sets + (["train.strategy=ddp"] if world > 1 else []) + list(req.overrides)


def set_args(overrides: list[str]) -> str:
    return " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def render_template(name: str, values: dict[str, object]) -> str:
    text = (launch_dir() / name).read_text()
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise OpenbookError(f"{launch_dir() / name}: no value for placeholder {{{{{missing[0]}}}}}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)


# Filesystems that only the machine they are on can see (a run dir on one of them cannot span nodes).
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat", "ramfs",
                     "devtmpfs"}


def filesystem_type(path: str | Path, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem holding ``path`` (its nearest existing parent), from ``mounts``; "?" where
    that cannot be read (not Linux)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    try:
        table = Path(mounts).read_text().splitlines()
    except OSError:
        return "?"
    best, kind = "", "?"
    for line in table:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def shared_fs_problems(cfg, nodes: int) -> list[str]:
    """With several nodes every rank and every encoder actor reads the token cache and writes or loads
    snapshot shards by path: those directories must be on a filesystem all nodes see."""
    if nodes < 2:
        return []
    out = []
    for what, path in (("run_dir", cfg.run_dir), ("snapshots.dir", cfg.snapshot_dir), ("data.cache_dir",
                                                                                        cfg.data.cache_dir)):
        kind = filesystem_type(path)
        if kind in LOCAL_FILESYSTEMS:
            out.append(f"{what} {path} is on a local filesystem ({kind}) but {nodes} nodes must all read and write it: "
                       "put it on a shared filesystem (NFS, Lustre, GPFS, ...), or pass --assume-shared-fs")
    return out


def plan(req: LaunchRequest) -> LaunchPlan:
    from openbook.recipe import load_recipe

    launch_dir()  # the templates, from the checkout or the installed wheel: one line if neither has them
    cfg = load_recipe(req.config, train_overrides(req))  # a bad recipe fails here, not on the cluster
    p = {"slurm": _slurm, "ray": _ray, "torchrun": _torchrun}[req.target](req, cfg)
    p.problems = [] if req.assume_shared_fs else shared_fs_problems(cfg, req.nodes)
    limit = slurm_seconds(req.time)
    if req.target == "slurm" and limit is not None and req.signal_seconds + 60 >= limit:
        p.problems.append(f"--signal-seconds {req.signal_seconds} within a minute of --time {req.time}: SLURM (which "
                          "may signal up to 60 s early) would stop the job before it trains; lengthen --time or "
                          "shorten --signal-seconds")
    if cfg.refresh.enabled and cfg.refresh.gpus_per_worker > 0 and not req.pool_gpus:
        p.problems.append(f"refresh.gpus_per_worker={cfg.refresh.gpus_per_worker:g} but the trainers take every GPU: "
                          "give --procs-per-node fewer than --gpus-per-node (the rest go to the refresh pool), or "
                          "set refresh.gpus_per_worker=0")
    return p


def _slurm(req: LaunchRequest, cfg) -> LaunchPlan:
    extra = [f"#SBATCH --gpus-per-node={req.gpus_per_node}"] if req.gpus_per_node else []
    extra += [f"#SBATCH --cpus-per-task={req.cpus_per_task}"] if req.cpus_per_task else []
    extra += [f"#SBATCH --partition={req.partition}"] if req.partition else []
    bin_dir = Path(sys.executable).parent
    script = render_template("slurm.sbatch", {
        "job_name": f"openbook-{cfg.name}", "nodes": req.nodes, "tasks_per_node": req.procs,
        "time": req.time, "signal_seconds": req.signal_seconds, "sbatch_extra": "\n".join(extra),
        "log_dir": shlex.quote(str(Path(cfg.run_dir).resolve() / "slurm")),
        "workdir": shlex.quote(str(Path.cwd())),
        "openbook": shlex.quote(str(bin_dir / "openbook")), "ray": shlex.quote(str(bin_dir / "ray")),
        "ray_port": RAY_PORT, "config": shlex.quote(req.config), "train_args": set_args(train_overrides(req)),
        "train_gpus": req.procs if req.gpus_per_node else 0, "ray_gpus": req.pool_gpus,
    })
    path = str(Path(cfg.run_dir) / "launch" / "slurm.sbatch")
    steps = [("here", f"mkdir -p {shlex.quote(str(Path(cfg.run_dir) / 'slurm'))}"),
             ("here", f"sbatch {shlex.quote(path)}")]
    return LaunchPlan("slurm", steps, {path: script})


def _torchrun(req: LaunchRequest, cfg) -> LaunchPlan:
    overrides = train_overrides(req)
    steps: list[tuple[str, str]] = []
    addr = req.master_addr or ("localhost" if req.nodes == 1 else "$MASTER_ADDR")
    ray_at = ""
    if req.nodes > 1:  # one Ray cluster for the refresher: head beside rank 0, every trainer joins it by address
        gpus = pool_gpu_env(req)  # each Ray node offers the GPUs its trainers leave, no more
        steps.append(("node 0", f"{gpus}ray start --head --port={RAY_PORT} --num-gpus={req.pool_gpus}"))
        steps += [(f"node {i}", f"{gpus}ray start --address={addr}:{RAY_PORT} --num-gpus={req.pool_gpus}")
                  for i in range(1, req.nodes)]
        # the head's address, not `auto`: auto takes the newest Ray the node's /tmp/ray knows, which on a node that
        # runs other Rays (another user's job, a notebook) is not this job's (the trainer then hangs connecting)
        ray_at = f' --set "refresh.address={addr}:{RAY_PORT}"'  # double quotes: $MASTER_ADDR expands
    script = shlex.quote(str(launch_dir() / "torchrun.sh"))
    # torchrun.sh sets devices and num_nodes from its own arguments
    rest = [o for o in overrides if not o.startswith(("train.devices=", "train.num_nodes="))]
    for rank in range(req.nodes):
        cmd = (f"PYTHON={shlex.quote(sys.executable)} bash {script} --nnodes {req.nodes} "
               f"--nproc_per_node {req.procs} --node_rank {rank} --master_addr {addr} "
               f"--master_port {req.master_port} --config {shlex.quote(req.config)} {set_args(rest)}{ray_at}")
        steps.append(("here" if req.nodes == 1 else f"node {rank}", cmd))
    return LaunchPlan("torchrun", steps)


def slurm_seconds(time: str) -> int | None:
    """SLURM's --time in seconds ([days-]hours:minutes:seconds, minutes:seconds, minutes, ...); None if unread."""
    days, _, rest = time.rpartition("-") if "-" in time else ("0", "", time)
    parts = rest.split(":")
    if not days.isdigit() or not all(x.isdigit() for x in parts) or len(parts) > 3:
        return None
    nums = [int(x) for x in parts]
    if "-" in time:  # days-hours[:minutes[:seconds]]
        h, m, sec = (nums + [0, 0])[:3]
    else:  # minutes, minutes:seconds, hours:minutes:seconds
        h, m, sec = {1: (0, nums[0], 0), 2: (0, *nums), 3: tuple(nums)}[len(nums)]
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def pool_gpu_env(req: LaunchRequest) -> str:
    """``CUDA_VISIBLE_DEVICES=...`` for a node's Ray: the GPUs after the trainers' (empty: none for the pool)."""
    ids = range(req.procs, req.gpus_per_node) if req.gpus_per_node else ()
    return f"CUDA_VISIBLE_DEVICES={','.join(map(str, ids))} "


def _ray(req: LaunchRequest, cfg) -> LaunchPlan:
    yaml_path, name = shlex.quote(str(launch_dir() / "ray_cluster.yaml")), f"openbook-{cfg.name}"
    workers = req.nodes - 1
    args = " ".join(filter(None, [f"--config {shlex.quote(req.config)} --address auto "  # the cluster `ray up` made
                                  f"--num-workers {req.nodes * req.procs}",
                                  "--use-gpu" if req.gpus_per_node else "", set_args(list(req.overrides))]))
    run = f"cd ~/openbook && .venv/bin/python launch/ray_train.py {args}"
    return LaunchPlan("ray", [
        ("here", f"ray up -y {yaml_path} --cluster-name {name} --min-workers {workers} "
                 f"--max-workers {workers}"),
        ("here", f"ray exec {yaml_path} --cluster-name {name} {shlex.quote(run)}"),
    ])


def run_plan(p: LaunchPlan) -> int:
    """Write the plan's files, then run its "here" steps in order (the others are printed instructions)."""
    import shutil
    import subprocess

    here = [cmd for where, cmd in p.steps if where == "here"]
    for cmd in here:  # every tool first: nothing is written or started if one is missing
        tool = next(w for w in shlex.split(cmd) if "=" not in w)  # skip VAR=value prefixes
        if shutil.which(tool) is None:
            raise OpenbookError(f"launch: {tool!r} not found on PATH (run where the {p.target} tools are)")
    if p.problems:
        raise OpenbookError(f"launch: {p.problems[0]}")
    for path, text in p.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    if not here:
        print("openbook launch: nothing runs from here; run each [node i] line on that node")
    for cmd in here:
        rc = subprocess.run(cmd, shell=True).returncode
        if rc != 0:
            return rc
    return 0
