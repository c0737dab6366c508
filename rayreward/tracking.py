"""Experiment trackers beside metrics.csv: TensorBoard, MLflow and Weights & Biases (`log.trackers`).

Rank 0 writes them, from the same rows as metrics.csv. MLflow and W&B runs start through Ray's own
integrations (`ray.air.integrations.mlflow.setup_mlflow`, `ray.air.integrations.wandb.setup_wandb`);
TensorBoard event files come from tensorboardX, the writer Ray's TensorBoard logger uses.

What each gets:
- params / config: the resolved config, flattened (`method.k`, `optim.lr`, ...);
- a scalar per metrics.csv column and step (reward and its parts, loss, grad norm, timings, calls);
- the start and end grids as images, and each grid's mean rewards (`grid/start/<reward>`);
- MLflow and W&B: the final LoRA folder (model card included) as an artifact.

A resumed run continues the same tracked run: the MLflow run id and the W&B run id are kept in
`<output_dir>/trackers.json`; TensorBoard drops the events at or past the resumed step
(`purge_step`), so the curves have no doubled steps.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from rayreward import config as config_mod
from rayreward import files

STATE_FILE = "trackers.json"
SKIPPED = ("step", "time")  # metrics.csv columns that are not curves


def flat_config(cfg: config_mod.Config) -> dict[str, str | int | float | bool]:
    """The config as {"section.field": value}; lists and dicts as their YAML flow text."""
    import yaml

    out: dict = {}

    def walk(prefix: str, node):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, dict)):
            out[prefix] = yaml.safe_dump(node, default_flow_style=True, width=10**6).strip()
        else:
            out[prefix] = "" if node is None else node

    walk("", cfg.to_dict())
    return out


def mlflow_uri(cfg: config_mod.Config, folder: str | os.PathLike | None = None) -> str:
    """The MLflow tracking URI a run uses: log.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else
    an SQLite store in `folder` (default: the output folder)."""
    if cfg.log.mlflow_tracking_uri:
        return cfg.log.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(folder or cfg.output_dir).resolve() / 'mlflow.db'}"


def wandb_mode(cfg: config_mod.Config) -> str:
    """log.wandb_mode, with "auto" resolved: $WANDB_MODE when set, else "online" when an API key
    is configured ($WANDB_API_KEY or `wandb login`), else "offline" (`wandb sync` uploads later)."""
    if cfg.log.wandb_mode != "auto":
        return cfg.log.wandb_mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import wandb

    try:
        wandb.ensure_configured()
        return "online" if wandb.api.api_key else "offline"
    except Exception:  # a broken settings file must not stop training: stay offline
        return "offline"


def resolve(cfg: config_mod.Config, experiment: str = "", folder: str | os.PathLike | None = None) -> None:
    """Fix, on the driver, what depends on its environment: the MLflow URI (the workers may run
    elsewhere, without $MLFLOW_TRACKING_URI; default store in `folder`, else the output folder),
    W&B's mode, and the experiment name (log.experiment, else `experiment`, else the run's name).
    Changes `cfg` in place."""
    lg = cfg.log
    lg.experiment = lg.experiment or experiment or cfg.name
    if "mlflow" in lg.trackers:
        lg.mlflow_tracking_uri = mlflow_uri(cfg, folder)
    if "wandb" in lg.trackers:
        lg.wandb_mode = wandb_mode(cfg)


@contextlib.contextmanager
def _env_kept(name: str):
    """Restore the environment variable `name` on exit to what it was on entry."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def read_ids(path: Path) -> dict[str, str]:
    """The tracked runs' ids a resume continues ({"mlflow": ..., "wandb": ...}); {} when the file
    is missing or unreadable (with a warning: the resume then starts new tracked runs)."""
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
        if isinstance(ids, dict) and all(isinstance(v, str) for v in ids.values()):
            return ids
    except (OSError, ValueError):
        pass
    print(f"[rayreward] warning: {path} is unreadable; the trackers start new runs", flush=True)
    return {}


class Trackers:
    """The trackers of `cfg.log.trackers` for one run (rank 0 only). Use as a context manager: the
    runs end on exit, marked failed when an exception leaves the block."""

    def __init__(self, cfg: config_mod.Config, resume_step: int = 0, enabled: bool = True):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.tb = self.mlflow = self.wandb = None
        names = cfg.log.trackers if enabled else []
        if not names:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / STATE_FILE
        ids = read_ids(state_path) if resume_step else {}
        params = flat_config(cfg)
        experiment = cfg.log.experiment or cfg.name
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step or None)
            if not resume_step:
                self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        if "mlflow" in names:
            self.mlflow = self._start_mlflow(params, experiment, ids.get("mlflow"))
            ids["mlflow"] = self.mlflow.active_run().info.run_id
        if "wandb" in names:
            self.wandb = self._start_wandb(params, experiment, ids.get("wandb"))
            ids["wandb"] = self.wandb.id
        files.write_text(state_path, json.dumps(ids))

    def _start_mlflow(self, params: dict, experiment: str, run_id: str | None):
        # mlflow.set_tracking_uri exports the URI: a later run in this process would inherit it
        with _env_kept("MLFLOW_TRACKING_URI"):
            return self._mlflow_run(mlflow_uri(self.cfg), params, experiment, run_id)

    def _mlflow_run(self, uri: str, params: dict, experiment: str, run_id: str | None):
        if run_id:  # a resume: the same run (setup_mlflow always starts a new one)
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.start_run(run_id=run_id)
            return mlflow
        from ray.air.integrations.mlflow import setup_mlflow

        local = uri.startswith("sqlite:///")
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri() if local else None
        return setup_mlflow(config=params, tracking_uri=uri, experiment_name=experiment, run_name=self.cfg.name,
                            create_experiment_if_not_exists=True, artifact_location=artifacts,
                            tags={"rayreward.method": self.cfg.method.name, "rayreward.model": self.cfg.model.name},
                            rank_zero_only=False)  # the caller is rank 0 already

    def _start_wandb(self, params: dict, experiment: str, run_id: str | None):
        import wandb
        from ray.air.integrations.wandb import setup_wandb

        mode = wandb_mode(self.cfg)
        with _env_kept("WANDB_MODE"):
            os.environ["WANDB_MODE"] = mode  # how setup_wandb knows that offline needs no API key
            return setup_wandb(config=params, rank_zero_only=False, trial_id=run_id or wandb.util.generate_id(),
                               trial_name=self.cfg.name, project=self.cfg.log.wandb_project, group=experiment,
                               mode=mode, dir=str(self.out), resume="allow" if mode == "online" else None,
                               reinit="finish_previous",
                               tags=[f"method-{self.cfg.method.name}"], settings=wandb.Settings(silent=True))

    def log_row(self, row: dict) -> None:
        """One metrics.csv row, at its step."""
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items()
                  if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_grid(self, label: str, path: Path, means: dict[str, float], step: int) -> None:
        """A grid image (`label` start or end) and its mean rewards."""
        import numpy as np
        from PIL import Image

        scalars = {f"grid/{label}/{k}": v for k, v in means.items()}
        if self.tb is not None:
            self.tb.add_image(f"grid/{label}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path), "grids")
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"grid/{label}": wandb.Image(str(path)), **scalars}, step=step)

    def log_lora(self, folder: Path) -> None:
        """The saved LoRA folder (weights and model card) as an artifact."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(str(folder), "lora")
        if self.wandb is not None:
            import wandb

            art = wandb.Artifact(f"{self.cfg.name}-lora", type="lora",
                                 metadata={"method": self.cfg.method.name, "model": self.cfg.model.name})
            art.add_dir(str(folder))
            self.wandb.log_artifact(art)

    def close(self, status: str = "FINISHED") -> None:
        """End the runs; `status` is MLflow's: FINISHED, FAILED or KILLED (interrupted)."""
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if status == "FINISHED" else 1)
        self.tb = self.mlflow = self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # Ctrl-C / SIGTERM reach a worker as KeyboardInterrupt or SystemExit, or Ray's abort
            self.close("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
        return False
