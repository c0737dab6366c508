"""A run's output folder: one run per folder, one process at a time, and what a restart resumes.

    OUTPUT_DIR/
      config.yaml              the run's resolved config; its `name` is the folder's owner
      metrics.csv  *.png  lora/
      ray/NAME/checkpoint_*/   checkpoints (or under train.storage): lora/, optimizer.pt, trainer_state.json, config.yaml
      resumes.jsonl            a line per resume that changed the config (train.resume=force)
      .rayreward.lock          held (flock) by the driver of the run in progress

The driver calls `prepare` before Ray or any model starts: it takes the lock, refuses a folder
that belongs to a run of another name, picks the newest checkpoint that reads back whole
(falling back past a corrupt one, with a warning), and refuses to resume when the checkpoint
was trained with another config, unless `train.resume: force`. Rank 0 keeps metrics.csv
(`MetricsLog`) and grid_scores.csv (`write_grid_scores`, `grid_change`) here.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rayreward import config as config_mod
from rayreward import files
from rayreward.errors import CheckpointError, RunFolderBusy, first_line
from rayreward.storage import Storage

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".rayreward.lock"
RESUMES_FILE = "resumes.jsonl"

# Fields that may change between a run and its resume: how long it runs, how often it saves,
# where and on what hardware, how rewards are hosted, what the grids show. Every other field
# shapes what is trained, so a resume with another value would mix two runs.
FREE_ON_RESUME = ("name", "output_dir", "train.steps", "train.max_unet_calls", "train.max_seconds", "train.checkpoint_every", "train.max_failures",
                  "train.use_gpu", "train.gpus_per_worker", "train.cpus_per_worker", "train.mixed_precision", "train.compile",
                  "train.vae_checkpointing", "train.resume",
                  "train.start_timeout_s",
                  "reward_server.", "grid.", "log.")


# Fields whose change makes a checkpoint's LoRA unloadable (other tensors or another base model):
# a resume with them changed is refused even with train.resume=force.
STRUCTURAL = ("lora.rank", "lora.target_modules", "model.name", "model.flavour")


@dataclass
class Resume:
    step: int = 0  # the next step to run
    skipped: int = 0  # non-finite steps skipped so far
    unet_calls: int = 0  # UNet calls per sample so far (train.max_unet_calls)
    seconds: float = 0.0  # training seconds so far (train.max_seconds)
    lora_state: dict | None = None  # peft-named LoRA tensors, checked finite
    optimizer_state: dict | None = None
    folder: str | None = None  # the checkpoint it came from
    config: dict = field(default_factory=dict)  # the config the checkpoint was trained with


def read_checkpoint(folder: str | os.PathLike) -> Resume:
    """Read a checkpoint whole (state, LoRA, optimizer, config), or raise CheckpointError naming
    the broken file. Nothing pickled runs: safetensors, and torch.load(weights_only=True)."""
    import torch

    from rayreward import lora_io

    folder = Path(folder)
    f = folder / STATE_FILE
    try:
        state = json.loads(f.read_text())
        step, skipped = int(state["step"]), int(state["skipped"])
        calls = int(state.get("unet_calls", 0))  # absent from checkpoints written before the call budget
        seconds = float(state.get("seconds", 0.0))  # and before the time budget
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    try:
        lora = lora_io.read_lora_state(folder / "lora")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'lora'}: {e}") from None
    f = folder / OPTIMIZER_FILE
    try:
        opt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {first_line(e)})") from None
    f = folder / CONFIG_FILE
    try:
        cfg = yaml.safe_load(f.read_text()) if f.exists() else {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    return Resume(step, skipped, calls, seconds, lora, opt, str(folder), cfg or {})


def write_checkpoint(folder: Path, unet, flavour: str, optimizer, step: int, skipped: int, cfg,
                     unet_calls: int = 0, seconds: float = 0.0) -> Path:
    import torch

    from rayreward import lora_io

    lora_io.save_lora(unet, folder / "lora", flavour)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "skipped": skipped, "unet_calls": unet_calls, "seconds": seconds,
                                                     "seed": cfg.train.seed}))
    config_mod.dump(cfg, folder / CONFIG_FILE)
    return folder


def checkpoint_folders(out: Path, name: str) -> list[Path]:
    """The run's checkpoints under the default storage (OUTPUT_DIR/ray), newest first."""
    return [Path(p) for p in Storage(str(out / "ray"), str(out / "ray")).checkpoints(name)]


def latest_usable(store: Storage, name: str) -> tuple[Resume | None, dict[str, str]]:
    """The newest checkpoint in `store` that reads back whole (its `folder`: its path in the
    storage), and {folder name: what is wrong} for each broken newer one. Raises CheckpointError
    when there are checkpoints and none is usable."""
    broken: dict[str, str] = {}
    for path in store.checkpoints(name):
        local = None
        try:
            with store.fetched(path) as local:
                resume = read_checkpoint(local)
            resume.folder = path
            return resume, broken
        except CheckpointError as e:  # named by its place in the storage, not a temporary copy's
            text = str(e) if local is None else str(e).replace(str(local), store.describe(path))
            broken[path.rstrip("/").rpartition("/")[2]] = text
    if broken:
        where = store.describe(store.run_path(name))
        raise CheckpointError(f"no checkpoint of run {name!r} can be read back: " + "; ".join(broken.values())
                              + f". Move {where} away to start the run over, or use a new output_dir")
    return None, {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "args":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "args" else v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """Training-relevant fields whose value differs: {field: (old, new)}. Training prompts are
    compared resolved (a prompt_file is read)."""
    def norm(d: dict) -> dict:
        d = dict(d)
        if d.get("prompt_file"):
            d["prompts"] = config_mod.from_dict({"prompts": ["x"], "prompt_file": d["prompt_file"]}).training_prompts()
        d.pop("prompt_file", None)
        return _flatten(d)

    defaults = config_mod.Config().to_dict()  # a field newer than the checkpoint has its default there
    a, b = norm(_merged(defaults, old)), norm(_merged(defaults, new))
    keys = list(dict.fromkeys([*a, *b]))
    free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE_ON_RESUME)  # noqa: E731
    return {k: (a.get(k), b.get(k)) for k in keys if not free(k) and a.get(k) != b.get(k)}


class RunLock:
    """An exclusive flock on OUTPUT_DIR/.rayreward.lock for the life of a run's driver; released
    by the OS when the process ends, however it ends. (flock may not be enforced across hosts
    on every network filesystem.)"""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: a symlink planted here would make the run overwrite its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if not self.path.is_symlink() and e.errno != errno.ELOOP:
                raise
            raise RunFolderBusy(f"output_dir: {str(self.path)!r} is a symbolic link, not a lock file rayreward made; "
                                "remove it (rayreward never writes through a link there)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, ...
            os.close(fd)
            raise RunFolderBusy(f"output_dir: {str(self.path)!r} is not a regular file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(f"output_dir {str(self.path.parent)!r} is in use by another rayreward run ({holder}); "
                                "two runs in one folder would interleave metrics.csv and checkpoints. Wait for it to "
                                "finish, or set output_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Plan:
    """What a run in a folder starts from."""

    resume: Resume | None  # None: a new run
    warnings: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)  # checkpoint folder names that are broken


def prepare(cfg, out: Path) -> Plan:
    """Checks before a run starts in `out` (lock held by the caller): the folder is this run's,
    and what it resumes from. Raises ConfigError for a folder of another run or a changed config,
    CheckpointError when no checkpoint reads back."""
    f = out / CONFIG_FILE
    if f.is_file():
        try:
            owner = (yaml.safe_load(f.read_text()) or {}).get("name")
        except yaml.YAMLError:
            owner = None
        if owner and owner != cfg.name:
            raise config_mod.ConfigError([
                f"output_dir: {str(out)!r} holds the run {owner!r}; a run named {cfg.name!r} would overwrite its "
                f"metrics.csv, grids and LoRA. Set output_dir to a new folder for a new run (or name: {owner} to "
                "resume that run)"])
    resume, broken = latest_usable(Storage.of(cfg), cfg.name)
    if resume is None:
        return Plan(None)
    warnings = [f"skipping a broken checkpoint ({why}); resuming from the one before it, at step {resume.step}"
                for why in broken.values()]
    changes = config_changes(resume.config, cfg.to_dict()) if resume.config else {}
    structural = {k: v for k, v in changes.items() if k in STRUCTURAL}
    if structural:  # the checkpoint's LoRA would not load into the new adapter: refused even with force
        lines = [f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in structural.items()]
        raise config_mod.ConfigError(
            [f"output_dir: {str(out)!r} holds run {cfg.name!r} at step {resume.step}, whose LoRA has another shape "
             "or base model than this config's; it cannot be resumed, not even with train.resume=force:"]
            + lines + ["for a new run with these values, set output_dir to a new folder"])
    if changes and cfg.train.resume != "force":
        lines = [f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changes.items()]
        raise config_mod.ConfigError(
            [f"output_dir: {str(out)!r} holds run {cfg.name!r} at step {resume.step}, trained with another config:"]
            + lines + ["to resume it anyway with the new values, add --set train.resume=force (the change is "
                       f"recorded in {RESUMES_FILE}); for a new run, set output_dir to a new folder"])
    if changes:
        files.append(out / RESUMES_FILE, json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "at_step": resume.step,
                                                     "checkpoint": resume.folder,
                                                     "changed": {k: list(v) for k, v in changes.items()}}) + "\n")
        warnings.append(f"train.resume=force: resuming at step {resume.step} with changed "
                        + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    return Plan(resume, warnings, list(broken))


# ---------------------------------------------------------------------------------------------
# The run's output files (rank 0): metrics.csv and grid_scores.csv.


class MetricsLog:
    """metrics.csv, appended a row a step; columns are the union of the rows' keys (empty where a
    row has none). On resume, rows at or past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.fields: list[str] = list(dict.fromkeys(k for r in self.rows for k in r))
        self._rewrite()

    def _rewrite(self):
        """The whole file, written to a temporary name and renamed over the old one: a kill or a
        full disk in between leaves the previous metrics.csv whole."""
        with files.written(self.path, newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, fieldnames=self.fields, restval="")
                w.writeheader()
                w.writerows(self.rows)

    def append(self, row: dict):
        self.rows.append(dict(row))
        if any(k not in self.fields for k in row):
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite()
        else:
            line = io.StringIO()
            csv.DictWriter(line, fieldnames=self.fields, restval="").writerow(row)
            files.append(self.path, line.getvalue())


def write_grid_scores(path: Path, label: str, prompts, seeds, scores: dict) -> dict[str, float]:
    """Record each grid image's rewards in grid_scores.csv: one row per (grid, prompt, seed),
    columns `grid` ("start" or "end"), `prompt`, `seed` and one per reward. Rows of an earlier
    `label` grid are replaced (a resumed run renders grid_end again); the others are kept.
    Returns the mean of each reward over this grid's images."""
    pairs = [(p, s) for p in prompts for s in seeds]  # render()'s row-major order
    rows = []
    try:  # an unreadable file or row is replaced: the grids are scored again on every run
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("grid") not in (label, None)]
    except (OSError, csv.Error, UnicodeDecodeError):
        rows = []
    for i, (p, s) in enumerate(pairs):
        rows.append({"grid": label, "prompt": p, "seed": s, **{k: float(v[i]) for k, v in scores.items()}})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with files.written(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return {k: float(v.float().mean()) for k, v in scores.items()}


def grid_change(path: Path) -> str:
    """'symmetry -0.0231 -> -0.0125, ...': each reward's mean over the start grid against the end
    grid (the same prompts and seeds), from grid_scores.csv; "" when either grid is missing."""
    if not path.is_file():
        return ""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    names = [k for k in (rows[0] if rows else {}) if k not in ("grid", "prompt", "seed")]
    means = {}
    for label in ("start", "end"):
        mine = [r for r in rows if r["grid"] == label]
        if not mine:
            return ""
        means[label] = {k: sum(float(r[k]) for r in mine) / len(mine) for k in names}
    return ", ".join(f"{k} {means['start'][k]:+.4f} -> {means['end'][k]:+.4f}" for k in names)
