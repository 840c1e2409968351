"""DeRIS run by onnxruntime from a folder written by `onnx_export.export_onnx`.

`OnnxDeris` stands where a `DerisModel` stands in the pipeline: `encode_image` runs the image
encoder graph once per image, calling it runs the expression graph on those features, and it
returns the same `ImageFeatures` / `DerisOutput` (torch tensors; the masks are upsampled and the
scores formed in torch, as `DerisModel` does). Execution providers: CPUExecutionProvider on the
CPU; on CUDA, CUDAExecutionProvider (named, untested here: no GPU was lent), with TensorRT
left to the user's own onnxruntime-gpu build. Intra-op threads follow torch's thread count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from .deris.answer import refer_scores
from .deris.config import DerisConfig
from .deris.model import DerisOutput, ImageFeatures, upsample_masks
from .errors import CheckpointError, InputError
from .fileio import file_sha256, read_json
from .onnx_export import EXPRESSION_FILE, EXPRESSION_OUTPUTS, IMAGE_ENCODER_FILE, ONNX_FORMAT_NAME, import_onnx, level_names
from .timing import StageTimer, stage


def providers(device: torch.device) -> List[str]:
    """onnxruntime execution providers for `device`, or InputError where this onnxruntime lacks them."""
    _, onnxruntime = import_onnx()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise InputError("runtime onnxruntime on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                         "this onnxruntime has " + ", ".join(onnxruntime.get_available_providers()))
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def session(path: Path, device: torch.device):
    """An onnxruntime InferenceSession of the graph at `path` on `device`, torch's thread count."""
    _, onnxruntime = import_onnx()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=providers(device))


class OnnxDeris:
    """An exported DeRIS (`folder`) on `device` through onnxruntime; float32 throughout."""

    def __init__(self, folder, device: torch.device = torch.device("cpu")):
        folder = Path(folder)
        sidecar = read_json(folder / "config.json", "ONNX export config")
        if sidecar.get("format") != ONNX_FORMAT_NAME:
            raise CheckpointError(f"{folder}: not a folder written by `deris-rerank export-onnx` (config.json format "
                                  f"{sidecar.get('format')!r})")
        for name, recorded in sidecar.get("sha256", {}).items():
            if file_sha256(folder / name) != recorded:
                raise CheckpointError(f"{folder / name} differs from the file the export wrote and checked; export again")
        self.folder, self.device = folder, device
        self.config = DerisConfig.from_dict(sidecar["config"])
        self.levels = level_names(int(sidecar["levels"]))
        self.image_encoder = session(folder / IMAGE_ENCODER_FILE, device)
        self.expression = session(folder / EXPRESSION_FILE, device)
        self.sha256 = json.dumps(sidecar["sha256"], sort_keys=True)

    def encode_image(self, image_hi: Tensor, timer: Optional[StageTimer] = None) -> ImageFeatures:
        """The image encoder graph on normalised images [B, 3, S, S] -> ImageFeatures (torch, on device)."""
        with stage(timer, "image_encoder"):
            mask_features, *multi_scale = self._run(self.image_encoder, {"image_hi": image_hi})
        return ImageFeatures(mask_features, multi_scale)

    def __call__(self, image_hi: Optional[Tensor], image_lo: Tensor, tokens: Tensor, padding_mask: Tensor,
                 batch_semantics: str = "per_sample", image_features: Optional[ImageFeatures] = None,
                 with_mask_logits: bool = True, timer: Optional[StageTimer] = None) -> DerisOutput:
        """As `DerisModel.forward` (per-sample batch semantics only)."""
        if batch_semantics != "per_sample":
            raise InputError("runtime onnxruntime runs per-sample batch semantics only; use the torch runtime for "
                             f"batch_semantics={batch_semantics!r}")
        if image_features is None:
            image_features = self.encode_image(image_hi, timer)
        feed = {"image_lo": image_lo, "tokens": tokens.long(), "padding_mask": padding_mask.long(),
                "mask_features": image_features.mask_features,
                **dict(zip(self.levels, image_features.multi_scale))}
        with stage(timer, "expression"):
            values = dict(zip(EXPRESSION_OUTPUTS, self._run(self.expression, feed)))
        out = DerisOutput(scores=refer_scores(values["refer_logits"]), text_padding=padding_mask.bool(), **values)
        if with_mask_logits:
            with stage(timer, "upsample"):
                out.mask_logits = upsample_masks(out.mask_logits_stride4)
        return out

    def _run(self, runner, feed) -> List[Tensor]:
        arrays = {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in feed.items()}
        return [torch.from_numpy(value).to(self.device) for value in runner.run(None, arrays)]
