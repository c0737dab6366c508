"""Several Ray nodes with disks of their own, on one machine, as on a real cluster.

The head (the driver's node) advertises no CPU, so the training workers land elsewhere, as on a
GPU cluster. Each worker node runs in a private mount namespace with a tmpfs over the driver's
output folder, so what a process there writes into that folder never reaches the driver's disk
(as on two machines). `shared/` stays visible to every node: a shared filesystem. Root only
(mount namespaces); CI runs as root.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SINGLE_NODE_FILES = {"config.yaml", "metrics.csv", "reward_curve.png", "grid_start.png", "grid_end.png",
                     "grid_scores.csv", "lora/pytorch_lora_weights.safetensors", "lora/README.md"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="needs root and unshare(1) for private mount namespaces (CI runs as root)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """A port of its own for every agent: the session's own local Ray may be up too."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]


class Cluster:
    """A head with no CPU and worker nodes with private runs folders; each node is a `ray start
    --block` in its own process group, so a test can kill one whole node."""

    def __init__(self, base: Path, env: dict[str, str] | None = None):
        self.base = base
        self.private = base / "driver"  # the driver's folder; a tmpfs of their own on worker nodes
        self.shared = base / "shared"  # every node sees it
        self.private.mkdir()
        self.shared.mkdir()
        self.temp = tempfile.mkdtemp(prefix="rr-mn-", dir="/tmp")  # Ray's unix sockets need a short path
        self.gcs = _free_port()
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_TRAIN_ENABLE_PRINT_PATCH="0",
                        RAY_AUTH_MODE="token", RAYREWARD_CACHE=os.environ["RAYREWARD_CACHE"],
                        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}  # node id -> its `ray start --block`
        self.head = self._start(["--head", f"--port={self.gcs}", "--num-cpus=0", "--include-dashboard=false",
                                 f"--temp-dir={self.temp}"], private=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    def _start(self, args: list[str], private: bool) -> str:
        before = self.node_ids() if self.nodes else set()
        ray_start = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                     *args, *_ports()]
        if private:
            script = f"mount -t tmpfs tmpfs {shlex.quote(str(self.private))} && exec {shlex.join(ray_start)}"
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        else:
            cmd = ray_start
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        for _ in range(90):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start failed:\n{proc.stdout.read()}")
            new = self.node_ids() - before
            if new:
                node = new.pop()
                self.nodes[node] = proc
                return node
            time.sleep(1)
        raise RuntimeError("a node did not join in 90 s")

    def add_worker(self, cpus: int = 2, resources: dict | None = None) -> str:
        args = [f"--address={self.address}", f"--num-cpus={cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return self._start(args, private=True)

    def node_ids(self) -> set[str]:
        code = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
                "print('NODES', *(n['NodeID'] for n in ray.nodes() if n['Alive']))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        lines = [x.split()[1:] for x in out.stdout.splitlines() if x.startswith("NODES")]
        return set(lines[-1]) if out.returncode == 0 and lines else set()

    def kill(self, node: str) -> None:
        """SIGKILL a whole node: its raylet and every worker process on it."""
        proc = self.nodes.pop(node)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def train(self, out: Path, *sets: str, timeout: float = 900) -> subprocess.Popen:
        cmd = [str(BIN / "rayreward"), "train", "--config", str(ROOT / "experiments/quickstart.yaml"),
               "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]
        return subprocess.Popen(cmd, env=dict(self.env, RAY_ADDRESS=self.address), cwd=self.base,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def close(self) -> None:
        for proc in self.nodes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_store():
    """A local S3-compatible store (moto's server) with an empty bucket: its endpoint URL."""
    port = _free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import boto3

        for _ in range(60):
            try:
                boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in S3_ENV.items()
                                                        if k != "AWS_DEFAULT_REGION"},
                             region_name="us-east-1").create_bucket(Bucket="rayreward-test")
                break
            except Exception:  # noqa: BLE001  (not up yet)
                time.sleep(0.5)
        else:
            pytest.fail("moto_server did not come up")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture(params=["shared", "s3"])
def storage_cluster(request, tmp_path):
    """(cluster, the train.storage settings): a folder every node mounts, or an s3:// bucket."""
    if request.param == "shared":
        c = Cluster(tmp_path)
        settings = [f"train.storage={c.shared / 'storage'}"]
    else:
        url = request.getfixturevalue("s3_store")
        c = Cluster(tmp_path, env=S3_ENV)
        settings = ["train.storage=s3://rayreward-test/runs", f"train.storage_endpoint={url}"]
    try:
        yield c, settings, request.param
    finally:
        c.close()


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


QUICK = ("train.steps=4", "train.checkpoint_every=2")


def test_a_local_storage_that_a_worker_node_cannot_see_is_refused_before_training(cluster):
    cluster.add_worker()
    out = cluster.private / "run"
    code, log = finish(cluster.train(out, *QUICK))
    assert code == 2, log[-3000:]
    assert "train.storage" in log and "cannot see" in log, log[-3000:]
    assert "step 0" not in log and not (out / "metrics.csv").exists()


# Each storage kind where it says the most, to keep CI's time: the shared folder for the complete
# output folder and the metrics against one machine; the object store for the lost node (which
# checks every file too). Both kinds passed both tests when the params listed both.
@pytest.mark.parametrize("storage_cluster", ["shared"], indirect=True)
def test_with_reachable_storage_the_driver_gets_every_file_a_single_node_run_writes(storage_cluster):
    cluster, storage, kind = storage_cluster
    worker = cluster.add_worker()
    out = cluster.private / "run"
    code, log = finish(cluster.train(out, *QUICK, *storage))
    assert code == 0, log[-3000:]
    assert SINGLE_NODE_FILES <= files(out), sorted(files(out))
    assert not (out / "ray").exists()  # the checkpoints are in the storage
    steps = pd.read_csv(out / "metrics.csv")
    assert list(steps.step) == [0, 1, 2, 3]
    starts = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    assert [s["rank0_node"] for s in starts] == [worker]  # trained on the worker node, written on the driver's
    if kind == "shared":
        assert any((cluster.shared / "storage" / "quickstart").glob("checkpoint_*"))
    # one line per line: each progress line reached the driver once
    assert sum(line.startswith("[rayreward] step 3 [4/4]") for line in log.splitlines()) == 1, log[-3000:]
    if kind != "shared":
        return
    # the same numbers as the same run on one machine (in-process, one thread, as the worker)
    import torch

    from rayreward import config, train

    single = config.load(ROOT / "experiments/quickstart.yaml", [*QUICK, f"output_dir={cluster.base / 'single'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run_training(single)
    finally:
        torch.set_num_threads(threads)
    alone = pd.read_csv(cluster.base / "single" / "metrics.csv")
    assert (steps.reward_mean - alone.reward_mean).abs().max() < 1e-4, (list(steps.reward_mean), list(alone.reward_mean))


@pytest.mark.parametrize("storage_cluster", ["s3"], indirect=True)
def test_a_lost_worker_node_restarts_the_group_from_storage_each_step_once(storage_cluster):
    cluster, storage, _ = storage_cluster
    nodes = {cluster.add_worker(), cluster.add_worker()}
    out = cluster.private / "run"
    proc = cluster.train(out, "train.steps=16", "train.checkpoint_every=2", "train.max_failures=1", *storage)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # past the first checkpoints
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) >= 6:
            break
        time.sleep(0.2)
    (start,) = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    cluster.kill(start["rank0_node"])  # the node rank 0 trains on, mid-run
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    steps = list(pd.read_csv(out / "metrics.csv").step)
    assert steps == list(range(16)), steps
    starts = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    assert [s["rank0_node"] for s in starts] == [start["rank0_node"], (nodes - {start["rank0_node"]}).pop()]
    assert starts[1]["resume_step"] >= 4  # resumed from a checkpoint in the storage, not from 0
    assert SINGLE_NODE_FILES <= files(out)


def test_reward_actors_go_to_the_reward_host_and_training_to_the_others(cluster):
    trainer = cluster.add_worker()
    host = cluster.add_worker(cpus=1, resources={"reward_host": 1})
    out = cluster.private / "run"
    code, log = finish(cluster.train(out, "train.steps=2", "train.checkpoint_every=2",
                                     f"train.storage={cluster.shared / 'storage'}", "reward_server.mode=remote",
                                     "reward_server.num_cpus=1", "reward_server.resources={reward_host: 1}"))
    assert code == 0, log[-3000:]
    (server,) = json.loads((out / "reward_servers.json").read_text())
    assert server["node_id"] == host
    starts = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    assert [s["rank0_node"] for s in starts] == [trainer]
