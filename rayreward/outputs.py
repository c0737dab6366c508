"""What a run writes into its output folder, written on the machine where that folder is.

On a cluster the training workers sit on machines whose disks the user never sees, so no worker
writes into `output_dir`. Rank 0 hands every file to a `RunOutputs`: config.yaml, the metrics
rows (metrics.csv, reward_curve.png), the grids (grid_*.png, grid_scores.csv), the final LoRA
and its model card, and the experiment trackers, which run inside it so that their files land
beside metrics.csv. Under `rayreward train` (and each trial of `rayreward tune`) it is an actor
that the driver starts on its own node (`start`), reached through Ray; in-process (tests,
benchmarks) it is a plain object. Either way rank 0 calls the same methods, one synchronous call
each, so a step's row is on disk before the next step starts.

A worker group that Ray Train restarts calls `open` again: the actor closes the trackers it had
and reopens the run at the checkpoint's step (metrics.csv is cut back there, the tracked runs
continue).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

from rayreward import config as config_mod
from rayreward import files as fileio
from rayreward import runfolder, tracking

STARTS_FILE = "starts.jsonl"  # a line each time the worker group starts: step, rank 0's node


class RunOutputs:
    """The output folder's writer for one run (see the module's docstring)."""

    def __init__(self, cfg: config_mod.Config):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.log: runfolder.MetricsLog | None = None
        self.trackers: tracking.Trackers | None = None

    def open(self, resume_step: int, node_id: str | None = None) -> None:
        """Before the first step: config.yaml (what `rayreward report` reads back), metrics.csv
        cut back to the checkpoint's step, the trackers (continuing a resumed run's), and a line
        in starts.jsonl: when the worker group (re)started, from which step, on which node rank 0
        runs (`node_id`, Ray's)."""
        if self.trackers is not None:  # a restarted worker group: its predecessor died mid-run
            self.trackers.close("KILLED")
        self.out.mkdir(parents=True, exist_ok=True)
        fileio.append(self.out / STARTS_FILE, json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                         "resume_step": resume_step, "rank0_node": node_id}) + "\n")
        config_mod.dump(self.cfg, self.out / "config.yaml")
        self.log = runfolder.MetricsLog(self.out / "metrics.csv", resume_step)
        self.trackers = tracking.Trackers(self.cfg, resume_step)

    def row(self, row: dict, plot: bool = False) -> None:
        """One step's metrics row; `plot`: redraw reward_curve.png (checkpoint steps)."""
        self.log.append(row)
        self.trackers.log_row(row)
        if plot:
            self.plot()

    def plot(self) -> None:
        from rayreward import render

        render.plot_metrics(self.out / "metrics.csv", self.out / "reward_curve.png")

    def grid(self, label: str, images, prompts: Sequence[str], seeds: Sequence[int], scores: dict,
             step: int) -> dict[str, float]:
        """grid_<label>.png of the images (prompts x seeds, row-major, in [0, 1]), their rewards in
        grid_scores.csv and the trackers; returns the grid's mean of each reward."""
        from rayreward import render

        path = render.save_grid(images, prompts, seeds, self.out / f"grid_{label}.png")
        means = runfolder.write_grid_scores(self.out / "grid_scores.csv", label, prompts, seeds, scores)
        self.trackers.log_grid(label, path, means, step=step)
        return means

    def lora(self, files: dict[str, bytes], name: str = "lora") -> Path:
        """A LoRA folder (the final `lora/`, or `lora_at_seconds/`), its files written whole (a
        temporary name, then a rename)."""
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            fileio.write_bytes(folder / file, data)
        return folder

    def finish(self, row: dict, flavour: str = "sd") -> str:
        """After the last step and the end grid: the model card, the LoRA to the trackers, the
        curve; `flavour`: the model family (its tags, its pipeline). Returns the grids' change ("symmetry -0.0335 -> -0.0159, ...", "" without both)."""
        from rayreward import card

        card.write(self.cfg, self.out / "lora", row, {"start": self.out / "grid_start.png",
                                                       "end": self.out / "grid_end.png"}, flavour)
        self.trackers.log_lora(self.out / "lora")
        self.plot()
        return runfolder.grid_change(self.out / "grid_scores.csv")

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked runs (MLflow's status: FINISHED, FAILED or KILLED); safe to call twice."""
        if self.trackers is not None:
            self.trackers.close(status)
            self.trackers = None

    def first_fault(self, step: int) -> bool:
        """Tests only (RAYREWARD_FAULT_STEP): True the first time a fault at `step` is asked for in
        this output folder (a marker file remembers it across the worker's death)."""
        marker = self.out / f".fault-injected-at-step-{step}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def ping(self) -> bool:
        return True


class Remote:
    """A RunOutputs actor, called like the object: each call waits for the actor's answer."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name: str):
        import ray

        method = getattr(self.handle, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


def start(cfg: config_mod.Config, node_id: str | None = None):
    """A RunOutputs actor on `node_id` (default: this process's node, where output_dir is), with
    no CPU of its own, so it never competes with the workers for a place."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    actor = ray.remote(RunOutputs).options(
        num_cpus=0, max_concurrency=1, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    handle = actor.remote(cfg)
    ray.get(handle.ping.remote())
    return handle


def lora_files(unet, flavour: str) -> dict[str, bytes]:
    """The final LoRA's files as bytes (saved to a temporary folder on this machine), to send
    to the RunOutputs on the driver's machine."""
    from rayreward import lora_io

    with tempfile.TemporaryDirectory(prefix="rayreward-lora-") as tmp:
        lora_io.save_lora(unet, Path(tmp), flavour)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def stop(handle, status: str = "FINISHED") -> None:
    """End the writer actor: its tracked runs closed with `status` (when rank 0 could not), then
    the actor. Nothing it wrote is lost: every call it answered had written its files."""
    import ray

    try:
        ray.get(handle.close.remote(status), timeout=60)
    except Exception:  # noqa: BLE001  (a dead writer must not hide the run's own outcome)
        pass
    ray.kill(handle)
