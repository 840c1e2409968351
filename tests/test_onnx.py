"""ONNX: export round-trips (both graphs checked, equal to PyTorch at any batch size), the pipeline
runs the export through onnxruntime with the same answers and its own run identity, and every
misuse is one line."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from deris_rerank import Pipeline, cli
from deris_rerank.errors import CheckpointError, InputError
from deris_rerank.precision_choice import synthetic_pair

onnx = pytest.importorskip("onnx", reason="needs the onnx extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnx, onnxruntime)")

from deris_rerank import onnx_export  # noqa: E402
from deris_rerank.onnx_runtime import OnnxDeris  # noqa: E402
from deris_rerank.run_identity import pipeline_identity  # noqa: E402

CPU = torch.device("cpu")
IMAGE = np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The test-sized model exported through the command, with its tokenizer and gate beside it."""
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    assert cli.main(["export-onnx", str(tiny_model_dir / "deris"), str(folder)]) == 0
    shutil.copyfile(tiny_model_dir / "gate.safetensors", folder / "gate.safetensors")
    shutil.copyfile(tiny_model_dir / "gate.json", folder / "gate.json")
    return folder


def test_the_export_writes_two_checked_graphs_and_what_it_checked(exported):
    sidecar = json.loads((exported / "config.json").read_text())
    assert sidecar["format"] == onnx_export.ONNX_FORMAT_NAME and sidecar["config"]["name"] == "test-tiny"
    assert (exported / "beit3.spm").is_file()  # the tokenizer beside the model was copied
    for name in (onnx_export.IMAGE_ENCODER_FILE, onnx_export.EXPRESSION_FILE):
        onnx.checker.check_model(str(exported / name))
    graph = onnx.load(str(exported / onnx_export.EXPRESSION_FILE)).graph
    assert [o.name for o in graph.output] == list(onnx_export.EXPRESSION_OUTPUTS)
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert 0 < max(sidecar["max_abs_diff_to_torch"].values()) < onnx_export.EXPORT_TOLERANCE


def test_onnxruntime_equals_pytorch_at_another_batch_size(exported):
    model, runner = build_tiny_model(), OnnxDeris(exported, CPU)
    pair = synthetic_pair(model.config, CPU)
    generator = torch.Generator().manual_seed(2)
    batch = {k: torch.cat([v, v]) for k, v in pair.items()}  # exported at batch 1, run at 3 (with a different first image)
    batch = {k: torch.cat([v, v[:1]]) for k, v in batch.items()}
    batch["image_hi"][0] = torch.randn(batch["image_hi"][0].shape, generator=generator)
    batch["image_lo"][0] = torch.randn(batch["image_lo"][0].shape, generator=generator)
    with torch.inference_mode():
        want = model(**batch)
    got = runner(**batch)
    for name in ("mask_logits", "scores", "existence_logit", "query_embed", "cognition_embed", "text_feat"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=0, atol=1e-4), name
    assert torch.equal(got.text_padding, want.text_padding)
    assert not torch.allclose(got.scores[0], got.scores[1])  # the first pair really was another input


def test_the_pipeline_through_onnxruntime_gives_the_torch_answers(exported, tiny_model_dir):
    plain = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu")
    through = Pipeline(deris=exported, device="cpu", runtime="onnxruntime")
    assert through.gate_path == exported / "gate.safetensors" and through.runtime == "onnxruntime"
    texts = ["the red car", "man on the left"]
    for want, got in zip(plain(IMAGE, texts), through(IMAGE, texts)):
        assert got.selected_rank == want.selected_rank
        assert np.allclose(got.scores, want.scores, rtol=0, atol=1e-4)
        assert (got.mask != want.mask).mean() < 1e-3
    encoded = through.encode(IMAGE)  # the image part once, many expressions
    assert np.array_equal(through(encoded, "the red car").scores, through(IMAGE, "the red car").scores)
    identity, torch_identity = pipeline_identity(through), pipeline_identity(plain)
    assert identity["runtime"] == "onnxruntime" and "runtime" not in torch_identity
    assert identity["model"]["sha256"] != torch_identity["model"]["sha256"]


def test_misuse_is_one_line(exported, tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match=r"is an ONNX export: run it with runtime=\"onnxruntime\""):
        Pipeline(deris=exported, device="cpu")
    with pytest.raises(InputError, match="runtime onnxruntime runs a folder written by `deris-rerank export-onnx`"):
        Pipeline(deris=tiny_model_dir / "deris", device="cpu", runtime="onnxruntime")
    with pytest.raises(InputError, match="runtime onnxruntime runs float32 exports; dtype int8"):
        Pipeline(deris=exported, device="cpu", runtime="onnxruntime", dtype="int8")
    with pytest.raises(InputError, match="runtime onnxruntime runs an exported folder"):
        Pipeline(deris=build_tiny_model(), device="cpu", runtime="onnxruntime")
    with pytest.raises(InputError, match="runtime must be torch or onnxruntime"):
        Pipeline(deris=exported, device="cpu", runtime="tensorrt")
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    with open(tampered / onnx_export.EXPRESSION_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CheckpointError, match="differs from the file the export wrote and checked; export again"):
        OnnxDeris(tampered, CPU)


def test_without_the_onnx_extra_export_says_how_to_install_it(monkeypatch, tiny_model_dir, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert cli.main(["export-onnx", str(tiny_model_dir / "deris"), str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("deris-rerank: error: ONNX export and the onnxruntime runtime need onnx and onnxruntime")
    assert 'pip install -e ".[onnx]"' in line and not (tmp_path / "out").exists()


def test_export_refuses_an_int8_model(tmp_path):
    from deris_rerank.int8 import quantize_int8

    with pytest.raises(InputError, match="export-onnx takes a float32 model"):
        onnx_export.export_onnx(quantize_int8(build_tiny_model()), tmp_path / "out")


def test_swin_windows_that_need_padding_export_right(tmp_path):
    """DeRIS-B's Swin-S has 7-token windows on a 96-token map: the padded size (98) must be rounded
    up in the traced graph too (a negative floor division traced to truncation gave 91)."""
    from deris_rerank.deris.config import SwinConfig
    from deris_rerank.deris.swin import SwinBackbone
    from deris_rerank.onnx_runtime import session

    torch.manual_seed(0)
    swin = SwinBackbone(SwinConfig(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=7)).eval()
    image = torch.randn(1, 3, 100, 92)  # 25 x 23 tokens: padded to 28 x 28, then 13 x 12 -> 14 x 14
    path = tmp_path / "swin.onnx"
    with torch.inference_mode(), pytest.warns(torch.jit.TracerWarning):
        torch.onnx.export(swin, (image,), str(path), dynamo=False, opset_version=onnx_export.OPSET)
        want = swin(image)
    got = session(path, CPU).run(None, {session(path, CPU).get_inputs()[0].name: image.numpy()})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < 1e-4


def test_a_graph_too_large_for_protobuf_keeps_its_weights_beside_it(monkeypatch, tmp_path):
    """DeRIS-L's expression part passes 2 GiB; forced here on the test-sized model."""
    monkeypatch.setattr(onnx_export, "LARGE_GRAPH_BYTES", 0)
    folder = onnx_export.export_onnx(build_tiny_model(), tmp_path / "large")
    sidecar = json.loads((folder / "config.json").read_text())
    assert set(sidecar["sha256"]) == {"image_encoder.onnx", "image_encoder.onnx.data", "expression.onnx", "expression.onnx.data"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*sidecar["sha256"], "config.json"])
    assert (folder / "expression.onnx").stat().st_size < (folder / "expression.onnx.data").stat().st_size
    model, runner = build_tiny_model(), OnnxDeris(folder, CPU)
    pair = synthetic_pair(model.config, CPU)
    with torch.inference_mode():
        want = model(**pair)
    assert torch.allclose(runner(**pair).scores, want.scores, rtol=0, atol=1e-4)
