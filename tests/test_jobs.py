"""`ray job submit` of the quickstart to a Ray head started on 127.0.0.1 (own ports, own process group)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # Ray's unix sockets need a short path
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_TRAIN_ENABLE_PRINT_PATCH="0",
               RAY_AUTH_MODE="token")  # as on a real cluster: the client reads the token the head made
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--disable-usage-stats",
         # the session's own local Ray may be up too: give every agent a port of its own
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(120):  # the job server answers once the dashboard is up
            try:
                urlopen(f"{url}/api/version", timeout=2)
                break
            except HTTPError:  # any HTTP answer (401: Ray's token auth is on by default) means it is up
                break
            except OSError:
                if head.poll() is not None:
                    pytest.fail(f"ray start failed:\n{head.stdout.read()}")
                time.sleep(1)
        else:
            pytest.fail("the Ray dashboard did not come up in 120 s")
        yield url, env
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # ends `ray start --block` and its children
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a Ray head and a submitted job
def test_ray_job_submit_runs_the_quickstart(ray_head, tmp_path):
    url, env = ray_head
    out = tmp_path / "job-out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
           "rayreward", "train", "--config", "experiments/tiny.yaml", "--set", "train.steps=3",
           "--set", "sampling.num_steps=4", "--set", "method.early_stop_m=2", "--set", f"output_dir={out}"]
    deadline = time.monotonic() + 90
    while True:  # the job agent can come up after the dashboard; Ray says "try again later"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if "No available agent" not in log or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "[3/3]" in log  # the last step's progress line
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3
