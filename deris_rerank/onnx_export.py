"""DeRIS as ONNX, in two graphs: the image encoder (run once per image) and the expression part.

`export_onnx(model, folder)` writes

    folder/image_encoder.onnx   image_hi float32 [B, 3, S, S] (normalised, S = config.image_size)
                                -> mask_features [B, C, S/4, S/4], multi_scale_0..L-1 [B, C, h_l, w_l]
                                (the pixel decoder's levels, coarse to fine)
    folder/expression.onnx      image_lo float32 [B, 3, s, s] (s = config.image_size_lo), tokens int64
                                [B, T], padding_mask int64 [B, T] (1 = padding, T = config.max_tokens),
                                mask_features, multi_scale_0..L-1 (as above)
                                -> mask_logits_stride4 [B, N, S/4, S/4], refer_logits [B, N, 2],
                                boxes [B, N, 4], existence_logit [B, 1], query_embed [B, N, C],
                                cognition_embed [B, N, C], text_feat [B, T, C]
    folder/config.json          the DeRIS config, each file's sha256 and what the export checked
    folder/*.onnx.data          a graph's weights, where it would pass protobuf's 2 GiB (DeRIS-L)

with B dynamic and every other size fixed by the config, as in `DerisModel` (images are resized to
S x S before the model; texts padded to T). The loopback decoder runs with per-sample batch
semantics. Both graphs are checked with `onnx.checker` and run once through onnxruntime against
PyTorch on the same synthetic pair; the largest differences are recorded and an export that
disagrees by more than `EXPORT_TOLERANCE` fails. `onnx_runtime.OnnxDeris` runs the folder.

The exporter is torch's TorchScript-based one (`dynamo=False`): the dynamo exporter fails on
Swin's window attention in torch 2.13 (a reshape its decompositions cannot view).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .errors import InputError, OutputError, install_hint
from .fileio import atomic_write, file_sha256

IMAGE_ENCODER_FILE = "image_encoder.onnx"
EXPRESSION_FILE = "expression.onnx"
ONNX_FORMAT_NAME = "deris-rerank-deris-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 17
EXPRESSION_OUTPUTS = ("mask_logits_stride4", "refer_logits", "boxes", "existence_logit", "query_embed",
                      "cognition_embed", "text_feat")
# largest difference to PyTorch accepted at export, on logits and embeddings of magnitude ~1-10
# (measured: 4e-6 on the test-sized model's mask logits)
EXPORT_TOLERANCE = 1e-3
LARGE_GRAPH_BYTES = 2**31 - 2**27  # above this a graph's weights go into a .data file beside it


def import_onnx():
    """(onnx, onnxruntime), or InputError saying how to install the `onnx` extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise InputError(f"ONNX export and the onnxruntime runtime need onnx and onnxruntime: "
                         f"{install_hint('onnx', 'onnx onnxruntime')}") from None
    return onnx, onnxruntime


class ImageEncoderGraph(nn.Module):
    """DerisModel.encode_image with tensor outputs: (mask_features, *multi_scale)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_hi: Tensor) -> Tuple[Tensor, ...]:
        features = self.model.encode_image(image_hi)
        return (features.mask_features, *features.multi_scale)


class ExpressionGraph(nn.Module):
    """DerisModel.forward on given image features, without the upsampling: EXPRESSION_OUTPUTS."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_lo: Tensor, tokens: Tensor, padding_mask: Tensor, mask_features: Tensor,
                *multi_scale: Tensor) -> Tuple[Tensor, ...]:
        from .deris.model import ImageFeatures

        out = self.model(None, image_lo, tokens, padding_mask, image_features=ImageFeatures(mask_features, list(multi_scale)),
                         with_mask_logits=False)
        return tuple(getattr(out, name) for name in EXPRESSION_OUTPUTS)


def level_names(levels: int) -> List[str]:
    return [f"multi_scale_{level}" for level in range(levels)]


def export_onnx(model: nn.Module, folder, opset: int = OPSET) -> Path:
    """Write `model` (a float32 DerisModel) as the two graphs above to `folder` and check them;
    returns the folder. Raises InputError without the `onnx` extra or for a non-float32 model,
    OutputError where the folder cannot be written, RuntimeError where the graphs disagree."""
    from .precision_choice import synthetic_pair

    onnx, onnxruntime = import_onnx()
    if any(p.dtype != torch.float32 for p in model.parameters()) or any(
            type(m).__module__.startswith("torch.ao") for m in model.modules()):
        raise InputError("export-onnx takes a float32 model (load it without --dtype)")
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the ONNX export to {folder}: {exc.strerror or exc}; choose a writable folder") from None
    model = model.cpu().eval()
    pair = synthetic_pair(model.config, torch.device("cpu"))
    with torch.inference_mode():
        features = ImageEncoderGraph(model)(pair["image_hi"])
    levels = level_names(len(features) - 1)
    image_args = (pair["image_hi"],)
    expression_args = (pair["image_lo"], pair["tokens"], pair["padding_mask"], *features)
    image_names = (["image_hi"], ["mask_features", *levels])
    expression_names = (["image_lo", "tokens", "padding_mask", "mask_features", *levels], list(EXPRESSION_OUTPUTS))
    files: List[str] = []
    for graph, args, (inputs, outputs), name in (
        (ImageEncoderGraph(model), image_args, image_names, IMAGE_ENCODER_FILE),
        (ExpressionGraph(model), expression_args, expression_names, EXPRESSION_FILE),
    ):
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # a large graph's external files stay apart
            with warnings.catch_warnings():  # the tracer's notes on Python ints from fixed sizes (all fixed by the config)
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, args, f"{scratch}/{name}", dynamo=False, opset_version=opset, input_names=inputs,
                                  output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs})
            proto = onnx.load(f"{scratch}/{name}")
        files += save_graph(onnx, proto, folder, name)
        onnx.checker.check_model(str(folder / name))
    checked = compare_with_torch(model, folder, image_args, expression_args)
    worst = max(checked.values())
    if worst > EXPORT_TOLERANCE:
        raise RuntimeError(f"the ONNX export in {folder} differs from PyTorch by {worst:.2e} (> {EXPORT_TOLERANCE}): {checked}")
    sidecar = {
        "format": ONNX_FORMAT_NAME, "format_version": ONNX_FORMAT_VERSION, "config": model.config.to_dict(),
        "opset": opset, "levels": len(levels), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "max_abs_diff_to_torch": checked,
        "sha256": {name: file_sha256(folder / name) for name in files},
    }
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    return folder


def save_graph(onnx, proto, folder: Path, name: str) -> List[str]:
    """Write `proto` as folder/name, its weights in folder/name.data where the graph would pass
    LARGE_GRAPH_BYTES (protobuf cannot hold 2 GiB: DeRIS-L's expression part); returns the files."""
    weights = sum(tensor.ByteSize() for tensor in proto.graph.initializer)  # the whole proto may not serialise
    if weights <= LARGE_GRAPH_BYTES:
        onnx.save_model(proto, str(folder / name))
        return [name]
    onnx.save_model(proto, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.data", size_threshold=1024)
    return [name, f"{name}.data"]


def compare_with_torch(model: nn.Module, folder: Path, image_args, expression_args) -> Dict[str, float]:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch on each graph output."""
    from .onnx_runtime import session

    diffs: Dict[str, float] = {}
    for graph, args, name in ((ImageEncoderGraph(model), image_args, IMAGE_ENCODER_FILE),
                              (ExpressionGraph(model), expression_args, EXPRESSION_FILE)):
        runner = session(folder / name, torch.device("cpu"))
        feed = {i.name: a.numpy() for i, a in zip(runner.get_inputs(), args)}
        with torch.inference_mode():
            want = graph(*args)
        for output, value, expected in zip(runner.get_outputs(), runner.run(None, feed), want):
            diffs[output.name] = float((torch.from_numpy(value) - expected).abs().max())
    return diffs


def is_onnx_export(path) -> bool:
    """Whether `path` is a folder written by `export_onnx`."""
    path = Path(path)
    return path.is_dir() and (path / IMAGE_ENCODER_FILE).is_file() and (path / EXPRESSION_FILE).is_file()
