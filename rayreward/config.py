"""Typed run configuration: dataclass defaults, YAML overrides, `--set a.b=v`, validation.

A YAML file only holds what differs from the defaults below. Loading refuses unknown keys and
wrong types, then checks the rules that span fields; every problem found is reported at once in
one `ConfigError`, before any model, Ray cluster or file is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayreward import families, files, methods, rewards, storage
from rayreward.errors import ConfigError

METHODS = tuple(methods.METHODS)
TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2")  # random-initialised, built into the cache on first use
BUILTIN_MODELS = TINY_MODELS + ("shapes", "shapes-layout")  # trained on the shapes world, shipped in the package
FLAVOURS = ("auto",) + families.NAMES  # model families (rayreward/families/)
PRECISIONS = ("auto", "no", "bf16", "fp16")
LOSS_KINDS = ("linear", "hinge", "absolute")
REWARD_MODES = ("local", "remote")
RESUME_MODES = ("auto", "force")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ModelConfig:
    # "tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" / "tiny-flux2" (random-initialised, built offline), "shapes" / "shapes-layout"
    # (64 px SD-1.x models trained on rayreward's shapes world, shipped in the package), a hub id such as
    # "stable-diffusion-v1-5/stable-diffusion-v1-5", or a local diffusers pipeline folder.
    name: str = "tiny"
    # the model family: "sd" (1.x/2.x), "sdxl", "sd3" (SD3/3.5), "flux" (FLUX.1), "flux2" (FLUX.2
    # [klein]), or "auto": read from the pipeline folder's model_index.json
    flavour: str = "auto"
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight-file variant on the hub, e.g. "fp16"
    seed: int = 0  # tiny models only: seed of the random initialisation
    resolution: int = 32  # image side in pixels (SD 1.5: 512, SDXL: 1024)
    # keep the text encoders on the CPU during training (T5-XXL is 4.7 B parameters): prompts are
    # encoded there, once per prompt (cached), so the denoiser, its LoRA and the chain own the GPU
    offload_text_encoders: bool = False


@dataclass
class LoraConfig:
    rank: int = 4  # LoRA rank r (AlignProp: 4)
    alpha: float = 4.0  # LoRA alpha; the update is scaled by alpha / rank (usually alpha = rank)
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )  # UNet sub-module names that get a LoRA (peft matching: suffix of the module path)


@dataclass
class SamplingConfig:
    num_steps: int = 10  # T, DDIM steps in the sampling chain
    guidance_scale: float = 5.0  # classifier-free guidance w; 1 disables the unconditional branch
    eta: float = 0.0  # DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise
    negative_prompt: str = ""  # the unconditional prompt of CFG
    # CFG's gradient: true (exact) flows through both branches; false runs the unconditional branch
    # without gradient (less memory, an approximate gradient; what FlowBP does on SD3.5)
    uncond_grad: bool = True


# The `method:` section: `name` (one of METHODS) and every method's parameters with their
# defaults (k, early_stop_m, lv_copies, refl_window, alignprop_range), declared in
# rayreward/methods.py, the one home of a method.
MethodConfig = methods.config_class()


@dataclass
class RewardSpec:
    name: str = "symmetry"  # registered reward name (rayreward/rewards/__init__.py) or "module:factory"
    weight: float = 1.0  # weight in the composite reward (a weighted sum)
    args: dict = field(default_factory=dict)  # keyword arguments of the reward factory


@dataclass
class LossConfig:
    # "linear": -r; "hinge": relu(margin - r) (ReFL); "absolute": |r - margin| (AlignProp target)
    kind: str = "linear"
    margin: float = 2.0  # hinge margin / absolute target
    scale: float = 1.0  # multiplies the loss


@dataclass
class OptimConfig:
    lr: float = 3e-3  # AdamW learning rate on the LoRA parameters
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon; larger values damp updates of near-zero gradients
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 30  # optimizer steps (with max_unet_calls: at most this many)
    # stop after the step at which this many UNet calls per sample have run in the chains (0: no
    # limit); a guided call counts once, DRaFT-LV's n copies n times, backward's recomputation not
    # at all. What an equal-compute comparison of methods fixes (metrics.csv: unet_calls_total)
    max_unet_calls: int = 0
    # stop after the step at which the run has trained this many seconds (the sum of s_step, the
    # slowest worker's; compile time and grids excluded; 0: no limit): an equal-wall-time budget
    max_seconds: float = 0.0
    # also save the LoRA as it is after the step at which the run has trained this many seconds
    # (the step train.max_seconds would stop on) into lora_at_seconds/, and go on (0: off): an
    # equal-wall-time result read from a longer run, without a second run
    lora_at_seconds: float = 0.0
    batch_size: int = 4  # prompts per step (per worker!)
    seed: int = 0  # seeds the noise, the step selection and the prompt order
    checkpoint_every: int = 10  # steps between checkpoints (the last step always checkpoints)
    gradient_checkpointing: bool = True  # recompute grad-carrying UNet calls in backward
    vae_checkpointing: bool = True  # recompute the VAE decoder's blocks in backward (its activations dominate the peak)
    # torch.compile of the UNet: "off", or a torch.compile mode: "default", "reduce-overhead" (CUDA
    # graphs on a GPU), "max-autotune". Compiling takes a while once per worker (printed apart)
    compile: str = "off"
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "no", "bf16", "fp16"
    num_workers: int = 1  # Ray Train workers (data parallel); the global batch is num_workers * batch_size
    use_gpu: bool = False  # a GPU per worker (NCCL); CPU workers use gloo
    gpus_per_worker: float = 1.0  # with use_gpu: a worker's GPU share; 0.5 lets a reward actor (num_gpus 0.5) share its GPU
    cpus_per_worker: float = 1.0  # CPUs a worker reserves; on CPU, torch uses as many threads (rounded, at least 1)
    max_failures: int = 0  # worker-group restarts (from the latest checkpoint) before the run fails
    # a run started again in the same output_dir resumes from its latest checkpoint. "auto": only
    # when the checkpoint was trained with the same config (else an error lists what differs);
    # "force": resume with the new values anyway, recorded in OUTPUT_DIR/resumes.jsonl
    resume: str = "auto"
    # seconds to wait for the cluster to place the workers and reward actors (autoscaling
    # included) before the run stops with a message naming what is missing
    start_timeout_s: float = 600.0
    # where Ray Train keeps the checkpoints: "" (OUTPUT_DIR/ray), a path that every node mounts (a
    # shared filesystem at the same path), or an object store URI (s3://bucket/prefix, gs://...,
    # abfs://...). On several nodes a local path some node cannot see is refused before training
    storage: str = ""
    storage_endpoint: str = ""  # with an s3:// storage: an S3-compatible store's URL, e.g. http://10.0.0.5:9000


@dataclass
class RewardServerConfig:
    mode: str = "local"  # "local": rewards in each worker; "remote": in reward actors
    replicas: int = 1  # remote: reward actors; worker r uses replica (r + step) % replicas
    num_cpus: float = 1.0  # remote: CPUs per reward actor
    num_gpus: float = 0.0  # remote: GPUs per reward actor (the reward runs on cuda when > 0)
    resources: dict = field(default_factory=dict)  # remote: custom resources, e.g. {reward_host: 1}
    max_restarts: int = 3  # remote: restarts of a dead reward actor (its calls are retried)


@dataclass
class GridConfig:
    prompts: list[str] = field(default_factory=list)  # grid prompts; empty = first 4 training prompts
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # one grid column per seed


TRACKERS = ("tensorboard", "mlflow", "wandb")
WANDB_MODES = ("auto", "online", "offline")


@dataclass
class LogConfig:
    """Experiment trackers beside metrics.csv (rayreward/tracking.py), written by rank 0."""
    trackers: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb
    experiment: str = ""  # MLflow experiment and W&B group; "" = the run's name (a sweep: the sweep's name)
    # "" = $MLFLOW_TRACKING_URI, else an SQLite store in the output folder (sqlite:///<output_dir>/mlflow.db)
    mlflow_tracking_uri: str = ""
    wandb_project: str = "rayreward"
    wandb_mode: str = "auto"  # "auto": online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline


@dataclass
class Config:
    name: str = "quickstart"  # run name: Ray Train run name and default output folder name
    output_dir: str = "runs/quickstart"  # metrics.csv, plots, grids, checkpoints, final LoRA
    prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog", "a red car", "a tree"])
    # text file, one prompt a line; replaces `prompts`. "builtin:NAME" is a set shipped with
    # rayreward (rayreward/prompts/NAME.txt: animals, styles, symmetry)
    prompt_file: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward_server: RewardServerConfig = field(default_factory=RewardServerConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_prompts(self) -> list[str]:
        return read_prompts(self.prompt_file, "prompt_file") if self.prompt_file else list(self.prompts)


def builtin_prompt_sets() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "prompts").glob("*.txt"))


def prompt_path(name: str) -> Path:
    """A prompt file's path; "builtin:NAME" is one of the sets shipped in rayreward/prompts/."""
    if name.startswith("builtin:"):
        return Path(__file__).parent / "prompts" / f"{name.split(':', 1)[1]}.txt"
    return Path(name)


PROMPT_SOURCES = ("a .txt file (one prompt a line), a .csv file (column 'prompt', else the first), a shipped set "
                  "({builtin}), or hpsv2:STYLE (the HPSv2 benchmark: anime, concept-art, paintings, photo)")


def _hpsv2_prompts(spec: str, field: str) -> list[str]:
    import json

    style = spec.split(":", 1)[1]
    root = Path(os.environ.get("HPS_ROOT", Path.home() / ".cache" / "hpsv2"))
    f = root / "datasets" / "benchmark" / f"{style}.json"
    if not f.is_file():
        raise ConfigError([f"{field}: {spec!r}: {f} does not exist. The HPSv2 benchmark prompts (anime, "
                           "concept-art, paintings, photo) come from the hpsv2 package's download "
                           "(python -c 'import hpsv2.utils as u; u.download_benchmark_prompts()', needs the "
                           "network once) into HPS_ROOT (default ~/.cache/hpsv2)"])
    return [str(p) for p in json.loads(f.read_text())]


def read_prompts(spec: str, field: str) -> list[str]:
    """The one reader of a prompt set, for every command: the training `prompt_file`, and the
    --prompts of `sample`, `eval` and `score`. `spec` is one of PROMPT_SOURCES; blank lines are
    skipped. Raises ConfigError naming `field` and `spec` when it is missing or holds no prompt."""
    if spec.startswith("hpsv2:"):
        prompts = _hpsv2_prompts(spec, field)
    else:
        p = prompt_path(spec)
        if not p.is_file():
            allowed = PROMPT_SOURCES.format(builtin=", ".join("builtin:" + n for n in builtin_prompt_sets()))
            raise ConfigError([f"{field}: {spec!r} does not exist; give {allowed}"])
        if p.suffix.lower() == ".csv":
            import csv

            with p.open(newline="") as f:
                table = list(csv.reader(f))
            header = table[0] if table else []
            col = header.index("prompt") if "prompt" in header else 0
            prompts = [row[col] for row in table[1:] if len(row) > col]
        else:
            prompts = p.read_text().splitlines()
    prompts = [x.strip() for x in prompts if x.strip()]
    if not prompts:
        raise ConfigError([f"{field}: {spec!r} holds no prompt"])
    return prompts


@dataclass(frozen=True)
class LoraArg:
    """A LoRA named on a command line (`sample`, `eval`): `--lora [NAME=]PATH[:SCALE]`."""

    name: str  # the variant's name in tables and grids ("" when not given)
    path: str  # a LoRA folder or .safetensors file
    scale: float = 1.0


# --------------------------------------------------------------------------------------------
# Building a Config from nested dicts, refusing unknown keys and wrong types.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):  # YAML reads .inf / .nan as floats; no field accepts them
            problems.append(f"{where}: {value!r} is not allowed; need a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {tp} at {where}")


def _build(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            problems.append(
                f"{where + '.' if where else ''}{key}: unknown key; allowed: {', '.join(names)}"
            )
    kwargs = {
        k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}", problems)
        for k, v in data.items()
        if k in names
    }
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Rules that span fields.


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.exists(name) or not _HUB_ID.match(name)


def looks_like_hub_id(name: str) -> bool:
    """'org/name' that is not a built-in model or a local path."""
    return name not in BUILTIN_MODELS and not _looks_like_path(name)


def validate(cfg: Config, training: bool = True) -> list[str]:
    """Every problem with `cfg` as 'field: value ...; allowed ...' lines (empty if none).
    `training` False (sample, eval): the method's rules are not checked; nothing trains."""
    p: list[str] = []
    T = cfg.sampling.num_steps
    m = cfg.method
    if T < 1:
        p.append(f"sampling.num_steps: {T} is not allowed; need an integer >= 1")
    if cfg.sampling.guidance_scale < 0:
        p.append(f"sampling.guidance_scale: {cfg.sampling.guidance_scale} is negative; need >= 0 (1 = no guidance)")
    if not 0.0 <= cfg.sampling.eta <= 1.0:
        p.append(f"sampling.eta: {cfg.sampling.eta} is outside [0, 1]")
    if training:
        p += methods.check(m, T)

    if cfg.lora.rank < 1:
        p.append(f"lora.rank: {cfg.lora.rank} is not allowed; need an integer >= 1")
    if cfg.lora.alpha <= 0:
        p.append(f"lora.alpha: {cfg.lora.alpha} is not allowed; need > 0")
    if not cfg.lora.target_modules:
        p.append("lora.target_modules: empty; name at least one UNet module, e.g. to_q")
    if cfg.optim.lr <= 0:
        p.append(f"optim.lr: {cfg.optim.lr} is not allowed; the learning rate must be > 0")
    if cfg.optim.weight_decay < 0:
        p.append(f"optim.weight_decay: {cfg.optim.weight_decay} is negative; need >= 0")
    if cfg.optim.eps <= 0:
        p.append(f"optim.eps: {cfg.optim.eps} is not allowed; need > 0")
    if cfg.optim.grad_clip < 0:
        p.append(f"optim.grad_clip: {cfg.optim.grad_clip} is negative; need >= 0 (0 disables)")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        p.append(f"optim.betas: {cfg.optim.betas} is not allowed; need two numbers in [0, 1)")
    if cfg.loss.kind not in LOSS_KINDS:
        p.append(f"loss.kind: {cfg.loss.kind!r} is unknown; allowed: {', '.join(LOSS_KINDS)}")

    if not cfg.rewards:
        p.append("rewards: empty; name at least one reward, e.g. [{name: symmetry}]")
    for i, r in enumerate(cfg.rewards):
        if not rewards.known(r.name):
            p.append(rewards.unknown_message(f"rewards[{i}].name", r.name))
    if not cfg.grid.seeds:
        p.append("grid.seeds: empty; the start and end grids need at least one seed, e.g. [0, 1]")
    if training and cfg.rewards and all(r.weight == 0 for r in cfg.rewards):
        p.append(f"rewards: every weight is 0 ({', '.join(f'{r.name} x 0' for r in cfg.rewards)}), so the loss is 0 "
                 "and training would change nothing; give the reward to train on a non-zero weight (weight 0 only "
                 "watches a reward)")

    t = cfg.train
    for key in ("steps", "batch_size", "checkpoint_every", "num_workers"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}: {getattr(t, key)} is not allowed; need an integer >= 1")
    if not 0 < t.cpus_per_worker < math.inf:
        p.append(f"train.cpus_per_worker: {t.cpus_per_worker} is not allowed; need a number > 0")
    if t.max_unet_calls < 0:
        p.append(f"train.max_unet_calls: {t.max_unet_calls} is not allowed; need an integer >= 0 (0: no limit)")
    if not 0 <= t.max_seconds < math.inf:
        p.append(f"train.max_seconds: {t.max_seconds} is not allowed; need a finite number >= 0 (0: no limit)")
    if not 0 <= t.lora_at_seconds < math.inf:
        p.append(f"train.lora_at_seconds: {t.lora_at_seconds} is not allowed; need a finite number >= 0 (0: off)")
    if t.max_failures < -1:
        p.append(f"train.max_failures: {t.max_failures} is not allowed; need >= 0, or -1 for unlimited")
    rs = cfg.reward_server
    if rs.mode not in REWARD_MODES:
        p.append(f"reward_server.mode: {rs.mode!r} is unknown; allowed: {', '.join(REWARD_MODES)}")
    if rs.replicas < 1:
        p.append(f"reward_server.replicas: {rs.replicas} is not allowed; need an integer >= 1")
    for key in ("num_cpus", "num_gpus"):
        if getattr(rs, key) < 0:
            p.append(f"reward_server.{key}: {getattr(rs, key)} is negative; need >= 0")
    bad = {k: v for k, v in rs.resources.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf}
    if bad:
        p.append(f"reward_server.resources: {bad} is not allowed; need {{name: amount >= 0}}")
    if rs.max_restarts < -1:
        p.append(f"reward_server.max_restarts: {rs.max_restarts} is not allowed; need >= 0, or -1 for unlimited")
    if not t.start_timeout_s > 0:
        p.append(f"train.start_timeout_s: {t.start_timeout_s} is not allowed; need seconds > 0")
    p += storage.check(t.storage, t.storage_endpoint)
    if t.resume not in RESUME_MODES:
        p.append(f"train.resume: {t.resume!r} is unknown; allowed: {', '.join(RESUME_MODES)}")
    if t.mixed_precision not in PRECISIONS:
        p.append(f"train.mixed_precision: {t.mixed_precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    if t.compile not in COMPILE_MODES:
        p.append(f"train.compile: {t.compile!r} is unknown; allowed: {', '.join(COMPILE_MODES)}")
    if not 0 < t.gpus_per_worker <= 1:
        p.append(f"train.gpus_per_worker: {t.gpus_per_worker} is not allowed; need a GPU share in (0, 1] (a worker "
                 "uses one device)")

    lg = cfg.log
    for i, name in enumerate(lg.trackers):
        if name not in TRACKERS:
            p.append(f"log.trackers[{i}]: {name!r} is unknown; allowed: {', '.join(TRACKERS)}")
        elif not _importable(TRACKER_MODULES[name]):
            p.append(f"log.trackers[{i}]: {name} needs the {TRACKER_MODULES[name]!r} package, which is not "
                     f"installed; pip install -c constraints.txt -e \".[{name}]\" (or \".[trackers]\" for all three)")
    if lg.wandb_mode not in WANDB_MODES:
        p.append(f"log.wandb_mode: {lg.wandb_mode!r} is unknown; allowed: {', '.join(WANDB_MODES)}")

    mc = cfg.model
    if mc.flavour not in FLAVOURS:
        p.append(f"model.flavour: {mc.flavour!r} is unknown; allowed: {', '.join(FLAVOURS)}")
    if mc.name not in BUILTIN_MODELS and _looks_like_path(mc.name) and not Path(mc.name).expanduser().is_dir():
        p.append(
            f"model.name: {mc.name!r} is neither a local folder that exists nor a hub id"
            f" ('org/name'); allowed: {', '.join(BUILTIN_MODELS)}, a hub id, or a diffusers pipeline folder"
        )
    if mc.resolution < 8 or mc.resolution % 8:
        p.append(f"model.resolution: {mc.resolution} is not allowed; need a multiple of 8, >= 8")

    if cfg.prompt_file is not None:
        try:
            cfg.training_prompts()
        except ConfigError as e:
            p += e.problems
    elif not cfg.prompts:
        p.append("prompts: empty; give at least one prompt, or a prompt_file")
    if any(r.name == "shapes_alignment" for r in cfg.rewards) and not p:
        p += _shapes_captions_only(cfg, training)
    return p


def _shapes_captions_only(cfg: Config, training: bool) -> list[str]:
    """shapes_alignment's judge reads captions of the shapes world only: every grid prompt, and
    when training every training prompt, must be one (checked here, not at the end of a run)."""
    from rayreward.shapes import world as shapes

    named = [(f"grid.prompts[{i}]", t) for i, t in enumerate(cfg.grid.prompts)]
    if training:
        where = f"prompt_file {cfg.prompt_file!r}" if cfg.prompt_file else "prompts"
        named += [(f"{where}[{i}]", t) for i, t in enumerate(cfg.training_prompts())]
    bad = []
    for field_, text in named:
        try:
            shapes.parse(text)
        except ValueError:
            bad.append(f"{field_}: {text!r} is not a caption of the shapes world, and reward shapes_alignment "
                       "reads only those; use captions such as 'a large red circle in the middle, on a white "
                       "background' (prompt_file: builtin:shapes)")
    return bad[:3] + ([f"... and {len(bad) - 3} more such prompts"] if len(bad) > 3 else [])


TRACKER_MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # what each tracker imports


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------
# Public entry points.


YAML_NODE_BUDGET = 100_000  # nodes a config may expand to, aliases followed (a real config has < 1000)


def safe_yaml(text: str, where: str):
    """YAML as plain data, refusing what would run away: a document whose aliases expand to more
    than YAML_NODE_BUDGET nodes (a 'billion laughs' tree), before it is built. ConfigError
    names `where` (the file or the --set)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: not valid YAML: {' '.join(str(e).split())}"]) from None
    sizes: dict[int, int] = {}

    def size(node) -> int:  # the expanded size, each distinct node counted once with its subtree
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        sizes[id(node)] = n
        if n > YAML_NODE_BUDGET:
            raise ConfigError([f"{where}: expands to more than {YAML_NODE_BUDGET:,} YAML nodes through its aliases "
                               "(&anchor / *alias); a config that large is refused"])
        return n

    if root is not None:
        size(root)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError([f"{where}: not valid YAML: {' '.join(str(e).split())}"]) from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict; the value is parsed as YAML (`k=3` is an int)."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r}: expected key=value, e.g. method.k=3"])
    key, raw = assignment.split("=", 1)
    value = safe_yaml(raw, f"--set {assignment!r}") if raw.strip() else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([f"--set {key}: {'.'.join(parts[:i])} has no item {part}"])
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError([f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping"])
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([f"--set {key}: list has no item {last}"])
        node[int(last)] = value
    else:
        node[last] = value


# Keys of older versions that are gone. A saved config.yaml of an older run holds them as null,
# which is dropped; a value is an error that says where the setting went.
RETIRED = {
    ("train", "fail_at_step"): "fault injection is a test hook now: the RAYREWARD_FAULT_STEP environment variable",
    ("reward_server", "fail_after_calls"): "fault injection is a test hook now: the RAYREWARD_FAULT_REWARD_CALLS "
                                           "environment variable",
}


def _drop_retired(data: dict) -> list[str]:
    problems = []
    for (section, key), where in RETIRED.items():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            if node.pop(key) is not None:
                problems.append(f"{section}.{key}: this setting was removed; {where}")
    return problems


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), training: bool = True) -> Config:
    """Build and validate a Config from the defaults, `data` and `key=value` overrides."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy, plain types only
    defaults = Config().to_dict()
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        # an override of a list item (rewards.0.weight) needs the default list to index into
        top = key.split(".")[0]
        if top in defaults and isinstance(defaults[top], list) and top not in data:
            data[top] = defaults[top]
        apply_override(data, assignment)
    problems: list[str] = _drop_retired(data)
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("compile"), bool):  # YAML reads `off` / `on` as booleans
        train["compile"] = "default" if train["compile"] else "off"
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems = validate(cfg, training)
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), training: bool = True) -> Config:
    """Load a YAML config file (None: the defaults) with `key=value` overrides, validated
    (`training` False: for rendering only, see `validate`)."""
    data = read_yaml_file(path, "--config") if path is not None else {}
    return from_dict(data, overrides, training)


def read_yaml_file(path: str | os.PathLike, field: str) -> dict:
    """A YAML file that holds a mapping, read as plain data (`safe_yaml`); ConfigError naming
    `field` and the path for a missing file, a folder or FIFO, text that is not UTF-8, bad YAML."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{field}: {str(path)!r} does not exist"])
    if not path.is_file():  # a folder, a FIFO, a device: reading it would fail or block
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError([f"{field}: {str(path)!r} is {kind}; give a YAML file, e.g. experiments/quickstart.yaml"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{field}: {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                           "save it as UTF-8"]) from None
    data = safe_yaml(text, f"{field} {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{field}: {str(path)!r} must hold a mapping at the top level"])
    return data


def dump(cfg: Config, path: str | os.PathLike) -> None:
    files.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
