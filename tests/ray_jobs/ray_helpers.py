"""Shared by the Ray tests: configs, a throwaway multi-node Ray cluster, MLflow helpers (the
synthetic data comes from ``support``). Imported as ``ray_jobs.ray_helpers`` (``tests`` is on
``pythonpath``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# 8 train classes x 8 images: batches of 2 classes x 4 images -> 8 batches per epoch.
TINY = [
    "model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=32", "data.image_size=32",
    "train.batch_size=8", "train.images_per_class=4", "train.epochs=2", "train.warmup_epochs=0",
    "train.lr=1e-3", "train.threads=1", "eval.batch_size=32", "eval.recall_ks=[1,2]", "eval.nmi=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_runs(uri: str, experiment: str = "idml"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{Path(tmp_path) / 'mlflow.db'}"


def env_without_ray_address() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


class RayCluster:
    """A Ray cluster of ``ray start --block`` child processes that this test owns: stopping them
    (SIGTERM) shuts down exactly this cluster, never another Ray instance on the machine (which
    ``ray stop`` would kill too).

    Every process gets ``RAY_ADDRESS`` (so Ray's own helpers never pick another instance on the
    machine), ``PYTHONPATH`` (the repository, as an installed package would be) and explicit
    token authentication: ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` when ``token`` is
    given, else the default token file (``~/.ray/auth_token``, created if missing, as
    ``ray.init`` does)."""

    def __init__(self, workdir, *, cpus: float = 2, dashboard: bool = False, token: str | None = None):
        import subprocess  # noqa: F401  (documented dependency of start/stop)

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        self.env = env_without_ray_address()
        self.env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if token is not None:
            self.env["RAY_AUTH_TOKEN"] = token
        elif not (Path.home() / ".ray" / "auth_token").exists():
            self._run([str(REPO / ".venv/bin/ray"), "get-auth-token", "--generate"])
        self.processes = []
        self.temp_dirs: list[str] = []
        # The Ray Client server on a free port, not its default 10001: another Ray instance's on a
        # shared machine, and when the server exits, `ray start --block` stops the whole node.
        args = ["--head", f"--port={self.port}", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                f"--ray-client-server-port={free_port()}"]
        if dashboard:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        self._start("head", args)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, cpus: float = 1) -> None:
        """Another node. It gets its own temp dir: nodes on one machine would otherwise share the
        head's session folder, and one node's runtime-env cleanup would delete files (the job's
        working dir) that another node still uses. (Short path: Unix socket names are limited.)"""
        import tempfile

        temp_dir = tempfile.mkdtemp(prefix="ray-node-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        self._start(f"node{len(self.processes)}", [f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0",
                                                   f"--temp-dir={temp_dir}"])

    def _run(self, cmd):
        import subprocess

        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)

    def _start(self, name: str, args: list[str], timeout: float = 120) -> None:
        import subprocess
        import time

        # The job server submits through each node's dashboard agent, whose default port (52365)
        # another Ray instance on the machine may hold: then no agent starts and no job runs.
        args = [*args, f"--dashboard-agent-listen-port={free_port()}"]
        log = self.workdir / f"ray-{name}.log"
        proc = subprocess.Popen([str(REPO / ".venv/bin/ray"), "start", "--block", *args], env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
        self.processes.append(proc)
        deadline = time.monotonic() + timeout
        while "block forever" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        # `ray start --block` checks its processes once a second and stops the node when one has
        # exited (on a loaded machine the Ray Client server gives up waiting for the node to
        # register): not started after all.
        time.sleep(3)
        self.check_alive()

    def check_alive(self) -> None:
        """Raise (with the log) if a node's ``ray start`` has stopped: connecting would hang."""
        logs = sorted(self.workdir.glob("ray-*.log"))
        if any(proc.poll() is not None for proc in self.processes) or any(
                "exited unexpectedly" in log.read_text() for log in logs):
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            self.stop()
            raise RuntimeError(f"a node of the Ray cluster at {self.address} has stopped:\n{tails}")

    def stop(self) -> None:
        import signal
        import subprocess

        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops its own processes
        for proc in self.processes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes = []
        # `ray start --head` records the cluster in /tmp/ray/ray_current_cluster; a record of a
        # cluster that is gone would make a later plain `ray.init()` wait for it.
        record = Path("/tmp/ray/ray_current_cluster")
        if record.exists() and record.read_text().strip() == self.address:
            record.unlink(missing_ok=True)
        import shutil

        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.temp_dirs = []


def cluster_processes(cluster: RayCluster, title: str) -> list[int]:
    """Pids of this cluster's processes whose title (Ray sets ``ray::<Actor>...``) starts with
    ``title``, found through /proc: only descendants of the cluster's own ``ray start``."""
    parents = {}
    titles = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            titles[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    roots = {p.pid for p in cluster.processes}

    def ours(pid):
        while pid > 1:
            if pid in roots:
                return True
            pid = parents.get(pid, 0)
        return False

    return sorted(pid for pid, t in titles.items() if t.startswith(title) and ours(pid))


def connect(cluster: RayCluster):
    """ray.init this test process into ``cluster``; returns a function that disconnects and
    restores the environment."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.update(RAY_ADDRESS=cluster.address, RAY_AUTH_MODE="token")
    # Ray caches RAY_AUTH_MODE when it is imported; re-read it the way ray.init itself does
    # when it turns token authentication on.
    from ray._raylet import Config

    Config.initialize("")
    ray.init(address=cluster.address, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False

    def disconnect():
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return disconnect


# The logical CPUs of the session's shared cluster (tests/conftest.py, ``shared_ray``): those of
# the 2-core machine the suite is sized for, as each module's own instance had before. (With 3,
# `idml index build --threads 1` sized a pool of 3 embedding actors and its Ray Data job stalled.)
SHARED_CPUS = 2


def shared_cluster(tmp_path_factory):
    """The session's Ray cluster (a head node with the dashboard and its job server), started
    once and shared by the Ray tests that need no cluster of their own; for a session-scoped
    fixture. Each module connects to it and disconnects again (``connected``), so a module
    that must run without Ray (``test_serve``) still finds this process unconnected."""
    try:
        cluster = RayCluster(tmp_path_factory.mktemp("ray-shared"), cpus=SHARED_CPUS, dashboard=True)
    except RuntimeError:  # a start that timed out on a loaded machine: every Ray test needs this one
        cluster = RayCluster(tmp_path_factory.mktemp("ray-shared"), cpus=SHARED_CPUS, dashboard=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def connected(cluster: RayCluster):
    """This test process connected to ``cluster`` for as long as the fixture lives."""
    import ray

    assert not ray.is_initialized(), "this process is already connected to a Ray instance"
    cluster.check_alive()
    disconnect = connect(cluster)
    try:
        yield cluster
    finally:
        disconnect()
