"""DeRIS checkpoints: the official `.pth` files and our safetensors folders.

Upstream key names map to ours through one prefix table (`UPSTREAM_PREFIXES`); below
each prefix the names are upstream's. Files are read only through `fileio`'s safe readers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from safetensors.torch import save_file as save_safetensors

from .deris.config import PRESETS, DerisConfig
from .deris.model import DerisModel
from .devices import autocast_weight_names, is_low_precision
from .errors import CheckpointError, OutputError
from .fileio import atomic_write, check_format, file_sha256, read_json, read_safetensors, read_torch_file, state_dict_mismatch
from .hub import is_hub_path
from .model_files import resolve_deris


# --- DeRIS ------------------------------------------------------------------------------

# Upstream state-dict prefixes -> ours. Below each prefix our names equal upstream's.
# Order matters: the first matching prefix wins.
UPSTREAM_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("understanding_branch.vis_enc.beit3.", "beit3."),
    ("understanding_branch.", "cognition."),
    ("perception_branch.hier_vision_encoder.", "swin."),
    ("perception_branch.pixel_decoder.", "pixel_decoder."),
    ("perception_branch.predictor.", "decoder."),
)

# Stored upstream but never used at inference (see the manifests' `unused_at_inference`):
# accepted and dropped.
UNUSED_AT_INFERENCE = re.compile(
    r"^(understanding_branch\.vis_enc\.beit3\.vision_embed\.mask_token"
    r"|understanding_branch\.logit_embed\.(weight|bias)"
    r"|perception_branch\.predictor\.cls_embed\.(weight|bias)"
    r"|perception_branch\.predictor\.SEG_proj\..+"
    r"|perception_branch\.predictor\.Q2TCA\.\d+\.cross_attn\.mapmlp\..+"
    r"|perception_branch\.nt_embed\.(weight|bias)"
    r"|perception_branch\.perception_query_embed\.weight"
    r"|head\.criterion\.empty_weight)$"
)

DERIS_WEIGHTS_FILE = "model.safetensors"
DERIS_CONFIG_FILE = "config.json"


def upstream_to_ours(name: str) -> Optional[str]:
    """Our parameter name for an upstream one; None when upstream's key is unused at inference."""
    if UNUSED_AT_INFERENCE.match(name):
        return None
    for upstream, ours in UPSTREAM_PREFIXES:
        if name.startswith(upstream):
            return ours + name[len(upstream) :]
    raise KeyError(name)


def is_upstream_state_dict(state: Mapping[str, Any]) -> bool:
    """True when the keys use upstream's names (`perception_branch.*`, `understanding_branch.*`)."""
    return any(k.startswith(("perception_branch.", "understanding_branch.")) for k in state)


def unwrap_upstream_checkpoint(checkpoint: Any, source: str) -> Dict[str, torch.Tensor]:
    """The state dict of an official `.pth`: `{"state_dict": ...}` or bare, `module.` stripped."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{source} holds no DeRIS state dict (expected {{'state_dict': ...}} or a bare state dict)")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_deris_preset(state: Mapping[str, torch.Tensor]) -> str:
    """Preset name of an upstream-named DeRIS state dict, from its shapes.

    BEiT-3 width 1024 -> DeRIS-L, 768 -> DeRIS-B; 10 queries -> RefCOCO, 20 -> gRefCOCO.
    """
    try:
        width = state["understanding_branch.vis_enc.beit3.text_embed.weight"].shape[1]
        queries = state["understanding_branch.init_query.weight"].shape[0]
        swin_dim = state["perception_branch.hier_vision_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a DeRIS checkpoint: key {exc} is missing; pass config= explicitly") from None
    for name, config in PRESETS.items():
        if (config.beit3.embed_dim, config.num_queries, config.swin.embed_dim) == (width, queries, swin_dim):
            return name
    raise CheckpointError(
        f"no DeRIS preset has BEiT-3 width {width}, {queries} queries and Swin width {swin_dim}; pass config= explicitly"
    )
DERIS_FORMAT_NAME = "deris-rerank-deris"
DERIS_FORMAT_VERSION = 1  # of config.json; raise it when a change needs a newer reader


def _resolve_config(config: Any) -> Any:
    return DerisConfig.preset(config) if isinstance(config, str) else config


def _read_deris_source(source: Any, config: Any) -> Tuple[Dict[str, torch.Tensor], Any, str]:
    """(state dict with OUR names, DerisConfig, description of the source)."""
    if isinstance(source, Mapping):
        state, origin, stored_config = dict(source), "the given state dict", None
    else:
        path = resolve_deris(source) if is_hub_path(source) else Path(source).expanduser()
        origin = source if is_hub_path(source) else str(path)
        if path.is_dir() or path.suffix == ".safetensors":
            folder = path if path.is_dir() else path.parent
            weights = path / DERIS_WEIGHTS_FILE if path.is_dir() else path
            state = read_safetensors(weights, "DeRIS weights")
            sidecar = read_json(folder / DERIS_CONFIG_FILE, "DeRIS config")
            check_format(sidecar, DERIS_FORMAT_NAME, DERIS_FORMAT_VERSION, folder / DERIS_CONFIG_FILE)
            stored_config = DerisConfig.from_dict(sidecar.get("config", {}), origin=str(folder / DERIS_CONFIG_FILE))
        else:
            state = unwrap_upstream_checkpoint(read_torch_file(path, "DeRIS checkpoint"), origin)
            stored_config = None
    if is_upstream_state_dict(state):
        config = _resolve_config(config) or DerisConfig.preset(detect_deris_preset(state))
        mapped = {}
        for name, tensor in state.items():
            try:
                ours = upstream_to_ours(name)
            except KeyError:
                raise CheckpointError(f"{origin}: unexpected key {name}{list(tensor.shape)} (not part of DeRIS)") from None
            if ours is not None:
                mapped[ours] = tensor
        return mapped, config, origin
    config = _resolve_config(config) or stored_config
    if config is None:
        raise CheckpointError(f"{origin}: state dict with our own key names needs config= (a preset name or DerisConfig)")
    return state, config, origin


def _derived_buffers(model: torch.nn.Module) -> Dict[str, Tuple[torch.nn.Module, str, torch.Tensor]]:
    """Buffers that are pure functions of the config: full name -> (module, attribute, value)."""
    found = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "derived_buffers"):
            for name, value in module.derived_buffers().items():
                found[f"{prefix}.{name}" if prefix else name] = (module, name, value)
    return found


def load_deris(source: Any, config: Any = None, device: Any = None, dtype: Optional[torch.dtype] = None,
               autocast_dtype: Optional[torch.dtype] = None):
    """Build a DerisModel and load weights into it, strictly; returns it in eval mode.

    source: an official `.pth`/`.pt` (`{"state_dict": ...}` or bare, optionally `module.`-prefixed;
    read with weights_only=True), our folder (or its `model.safetensors`) with `config.json`, either
    of them as an `hf://OWNER/REPO[@REVISION]/PATH` of the Hugging Face Hub (see `model_files`), or a
    state dict with upstream or our names. config: a preset name or DerisConfig; detected from
    the shapes of an upstream state dict when None. Unused-at-inference keys are dropped; buffers
    that are functions of the config (Swin `relative_position_index`) are checked, not loaded.
    The model is built on the meta device and takes the checkpoint's tensors, so loading needs
    about one copy of the weights in memory. autocast_dtype (bfloat16 / float16): the linear and
    convolution weights are stored in it, converted one by one as they are adopted (the model is
    then to run under that autocast: `devices.store_for_autocast` says why); float32/None: as read.
    """
    state, config, origin = _read_deris_source(source, config)
    with torch.device("meta"):
        model = DerisModel(config)
    derived = _derived_buffers(model)
    loadable = {k: v for k, v in state.items() if k not in derived}
    mismatch = state_dict_mismatch(model.state_dict(), loadable)
    if mismatch:
        raise CheckpointError(f"{origin} does not fit DeRIS config {config.name!r}: {mismatch}")
    for name, (module, attribute, value) in derived.items():
        stored = state.get(name)
        if stored is not None and stored.device.type != "meta" and not torch.equal(stored.cpu(), value.cpu()):
            raise CheckpointError(f"{origin}: {name} differs from the one its window size implies; wrong config?")
    if is_low_precision(autocast_dtype):
        low_precision = set(autocast_weight_names(model))
        for name in loadable:  # one at a time; copies of the rest too, so nothing keeps the float32 file mapped
            converted = loadable[name].to(autocast_dtype) if name in low_precision else loadable[name].clone()
            state[name] = loadable[name] = converted
    model.load_state_dict(loadable, strict=True, assign=True)
    for module, attribute, value in derived.values():
        module.register_buffer(attribute, value, persistent=False)
    return model.to(device=device, dtype=dtype).eval()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a DeRIS checkpoint's weights: the one recorded in our folder's config.json, else the file's."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.suffix == ".safetensors":
        recorded = read_json(folder / DERIS_CONFIG_FILE, "DeRIS config").get("sha256", {}).get(DERIS_WEIGHTS_FILE)
        if recorded:
            return recorded
        path = folder / DERIS_WEIGHTS_FILE
    return file_sha256(path)


def save_deris(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write `folder/model.safetensors` (our key names) and `folder/config.json` with its sha256."""
    folder = Path(folder).expanduser()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        weights = atomic_write(folder / DERIS_WEIGHTS_FILE, lambda tmp: save_safetensors(state, tmp, metadata={"format": DERIS_FORMAT_NAME}))
        sidecar = {"format": DERIS_FORMAT_NAME, "format_version": DERIS_FORMAT_VERSION, "config": model.config.to_dict(), "sha256": {DERIS_WEIGHTS_FILE: file_sha256(weights)}}
        atomic_write(folder / DERIS_CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    except OSError as exc:
        raise OutputError(f"cannot write DeRIS weights to {folder}: {exc.strerror or exc}; choose a writable folder") from None
    return folder
