"""The benchmark scripts run end to end (tiny shapes, CPU), so they do not rot between GPU runs."""

import subprocess
import sys

import pytest

from helpers import ROOT


def test_gpu_benchmark_runs_on_the_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--shapes", "tiny", "--device", "cpu",
                        "--steps", "2", "--repeats", "1", "--batch", "1", "--methods", "drtune", "draft_lv",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "device: CPU" in text and "chain/stock" in text and "step_over_parts" in text
    for method in ("drtune", "draft_lv"):
        assert f"tiny {method}" in r.stderr.replace("T=  2 ", "")  # one progress line per method


@pytest.mark.slow  # compiles the tiny UNet a few times: minutes on 2 cores
def test_gpu_benchmark_compiled_mode_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--shapes", "tiny", "--device", "cpu",
                        "--steps", "2", "--repeats", "1", "--batch", "1", "--methods", "drtune",
                        "--compile", "default"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled/stock (default)" in r.stdout and "s_compile" in r.stdout


def test_shapes_model_benchmark_reads_the_shipped_model():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/shapes_model.py"), "--captions", "4", "--seeds", "0",
                        "--steps", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "T=4: labels read" in r.stdout and "(4 pictures" in r.stdout and "background" in r.stdout


def test_gpu_benchmark_runs_on_the_tiny_flow_shapes_with_offloaded_text_encoders(tmp_path):
    """The code path of --shapes sd35m flux1 (the stock SD3 / FLUX pipelines beside the chain,
    the training rows with the text encoders on the CPU), on the tiny models of those classes."""
    out = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--shapes", "tiny-sd3", "tiny-flux",
                        "--device", "cpu", "--steps", "2", "--repeats", "1", "--batch", "1", "--methods", "drtune",
                        "--offload-text-encoders", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "tiny-sd3" in text and "tiny-flux" in text and "step_over_parts" in text
