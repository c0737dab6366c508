"""LoRA files (safetensors, diffusers layout) of a denoiser's peft adapter: save, read, load as a
new adapter, load into an existing adapter (resume), apply several with weights (DRaFT's scaling
and mixing). `models.add_lora` adds the adapter that training fits. Keys carry the family's
prefix (`unet.` for SD / SDXL, `transformer.` for SD3), as the stock pipelines write and read them.

Every load checks that each saved tensor landed in the adapter: peft only warns about keys it
could not place, which would leave part of a LoRA silently unused. Only safetensors are read, so
no pickled code runs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from rayreward.errors import LoraFileError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


PREFIXES = ("unet", "transformer")  # what a family's LoRA keys start with


def pipeline_class(flavour: str):
    """The stock pipeline class of a model family (its save_lora_weights / load_lora_weights)."""
    import diffusers

    from rayreward import families

    return getattr(diffusers, families.get(flavour).pipeline_class)


def prefix_of(denoiser: torch.nn.Module) -> str:
    """The LoRA key prefix of a denoiser: "unet" for a UNet, "transformer" otherwise."""
    return "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"


def _check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraFileError(f"{what}: {len(bad)} of {len(state)} LoRA tensors hold NaN or inf (first: {bad[0]}); "
                            "a non-finite LoRA renders black images. Use an earlier checkpoint "
                            "(OUTPUT_DIR/ray/NAME/checkpoint_*/lora) or a lower optim.lr")


def save_lora(unet: torch.nn.Module, folder: str | os.PathLike, flavour: str, adapter_name: str = "default") -> Path:
    """Write `pytorch_lora_weights.safetensors` (rank and alpha in its metadata), so a stock
    pipeline's `load_lora_weights(folder)` loads it.

    Every key is in peft's naming (`unet.<module>.lora_A.weight` / `lora_B`), for every target
    module type. The older diffusers naming (`lora.down` / `lora.up`) is not used because
    diffusers' converter renames only some module types (attention projections, not
    convolutions), and its loader picks one naming from the file's first key: a mixed file
    loaded with part of its weights silently unused. A non-finite LoRA is refused."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    _check_finite(state, f"saving the LoRA to {str(folder)!r}")
    meta = unet.peft_config[adapter_name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    kind = prefix_of(unet)
    pipeline_class(flavour).save_lora_weights(str(folder), **{f"{kind}_lora_layers": state,
                                                               f"{kind}_lora_adapter_metadata": meta},
                                               safe_serialization=True)
    _add_family(Path(folder) / LORA_WEIGHT_NAME, flavour)
    return Path(folder) / LORA_WEIGHT_NAME


FAMILY_KEY = "rayreward_family"  # the safetensors metadata entry naming the model family a LoRA is for


def _add_family(path: Path, flavour: str) -> None:
    """Record the model family in the file's metadata (the loaders ignore entries they do not
    know), so `export` knows the layout to write; rewritten whole (temporary file, rename)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta[FAMILY_KEY] = flavour
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def lora_family(path) -> str | None:
    """The model family a LoRA file was saved for (rayreward writes it), None for other files."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), framework="pt") as f:
        return (f.metadata() or {}).get(FAMILY_KEY)


def file_prefix(state: dict) -> str:
    """The denoiser prefix a LoRA state's keys carry ("unet" when none does: older files)."""
    found = [p for p in PREFIXES if any(k.startswith(p + ".") for k in state)]
    return found[0] if found else "unet"


def lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a file or a folder; a clear error otherwise."""
    p = Path(path).expanduser()
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"LoRA {str(path)!r}: no such file (expected a folder holding {LORA_WEIGHT_NAME} or a .safetensors file)")
    if f.suffix != ".safetensors":
        raise LoraFileError(f"LoRA {str(path)!r}: only .safetensors LoRA files are loaded (no pickled checkpoints)")
    return f


def read_lora_state(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA file's denoiser tensors in peft naming (`<module>.lora_A.weight`), checked finite;
    `prefix` is the denoiser's ("unet" or "transformer"; None: the one the file's keys carry): a
    LoRA whose keys carry the other one was trained on another family and is refused, naming both. Files in the older diffusers
    naming (`lora.down`/`lora.up`, also mixed) are converted."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = lora_file(path)
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"LoRA {str(path)!r}: {f} is not a readable safetensors file ({e})") from None
    state = {k: v for k, v in state.items() if not k.startswith(("text_encoder", "te_"))}
    if prefix is None:
        prefix = file_prefix(state)
    others = sorted({k.split(".")[0] for k in state if k.split(".")[0] in PREFIXES and k.split(".")[0] != prefix})
    if others and not any(k.startswith(prefix + ".") for k in state):
        raise LoraFileError(f"LoRA {str(path)!r} is a LoRA of a {others[0]} (its keys start with {others[0]!r}), and "
                            f"this model's denoiser is a {prefix}: it was trained on another model family")
    state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
    if not state:
        raise LoraFileError(f"LoRA {str(path)!r}: {f} holds no {prefix} LoRA weights")
    _check_finite(state, f"LoRA {str(path)!r}")
    # converted key by key, so a file mixing both namings is read whole
    out = {}
    for k, v in state.items():
        out.update(convert_unet_state_dict_to_peft({k: v}))
    return out


def _assert_all_used(unet: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str, path) -> None:
    """Every tensor of the file must now sit in the adapter, equal: peft only warns about keys
    it could not place, which would leave part of a LoRA silently unused."""
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    unused = [k for k, v in state.items() if k not in loaded or loaded[k].shape != v.shape
              or not torch.equal(loaded[k].detach().float().cpu(), v.float())]
    if unused:
        raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: {len(unused)} of {len(state)} saved tensors "
                            f"were not loaded (first: {unused[0]}). Was it trained on another base model or with "
                            "other lora.target_modules?")
    missing = [k for k in loaded if k not in state]
    if missing:
        raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: it has no weights for {len(missing)} of "
                            f"the adapter's tensors (first: {missing[0]}); lora.rank or lora.target_modules differ")


def load_lora(unet: torch.nn.Module, path: str | os.PathLike, adapter_name: str, family: str | None = None) -> None:
    """Add the LoRA at `path` to the denoiser as a new adapter; every saved weight must be used.
    `family`: the model's family; a LoRA saved for another one is refused, naming both."""
    saved_for = lora_family(path)
    if family is not None and saved_for is not None and saved_for != family:
        raise LoraFileError(f"LoRA {str(path)!r} was trained on a {saved_for} model and this model is {family}: a "
                            "LoRA only fits the model family (and base model) it was trained on")
    prefix = prefix_of(unet)
    state = read_lora_state(path, prefix)
    _check_shapes(unet, state, path)
    with warnings.catch_warnings():  # several adapters side by side is what this function is for
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter({f"{prefix}.{k}": v for k, v in state.items()}, prefix=prefix,
                               adapter_name=adapter_name, metadata=lora_metadata(path))
    _assert_all_used(unet, state, adapter_name, path)


def _check_shapes(unet: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Each saved lora_A/lora_B must fit its module's input/output size (a LoRA of another base
    model would fail deep inside peft with a list of every mismatch)."""
    modules = dict(unet.named_modules())
    for key, v in state.items():
        name, _, kind = key.rpartition(".lora_")
        m = modules.get(name)
        if m is None:
            raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: it has weights for {name!r}, which "
                                "this model's denoiser does not have. Was it trained on another base model?")
        base = getattr(m, "base_layer", m)
        fan_in = getattr(base, "in_features", getattr(base, "in_channels", None))
        fan_out = getattr(base, "out_features", getattr(base, "out_channels", None))
        want = fan_in if kind.startswith("A") else fan_out
        got = v.shape[1] if kind.startswith("A") else v.shape[0]
        if want is not None and (got != want or v.dim() != (4 if isinstance(base, torch.nn.Conv2d) else 2)):
            raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: {key} has shape {tuple(v.shape)}, "
                                f"but {name} is a {type(base).__name__} of {fan_in} -> {fan_out}. Was it trained on "
                                "another base model?")


def lora_prefix(path) -> str:
    """The denoiser prefix of a LoRA file's keys: "unet" (SD, SDXL) or "transformer" (SD3)."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), framework="pt") as f:
        return file_prefix(dict.fromkeys(f.keys()))


def lora_metadata(path) -> dict | None:
    """The adapter config saved in the file's metadata (rank, alpha, targets), if any."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else None  # keys "unet.r", ...: the loader strips its prefix


def load_lora_weights_into(unet: torch.nn.Module, source: str | os.PathLike | dict, adapter_name: str = "default",
                           what: str = "checkpoint") -> None:
    """Copy saved LoRA weights (a file/folder, or a state already read by `read_lora_state`) into
    an existing adapter (resume); names and shapes must match, every tensor must be used."""
    from peft.utils import set_peft_model_state_dict

    state, path = (source, what) if isinstance(source, dict) else (read_lora_state(source, prefix_of(unet)), source)
    _check_shapes(unet, state, path)
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    _assert_all_used(unet, state, adapter_name, path)


def apply_loras(unet: torch.nn.Module, loras: Sequence[tuple[str, float]], family: str | None = None) -> list[str]:
    """Load several LoRAs and activate them with weights: one LoRA with weight s interpolates
    base (0) <-> tuned (1); several are mixed as a weighted sum of their updates."""
    names = []
    for i, (path, _) in enumerate(loras):
        names.append(f"lora{i}")
        load_lora(unet, path, names[-1], family)
    if names:
        unet.set_adapters(names, [float(w) for _, w in loras])
    return names
