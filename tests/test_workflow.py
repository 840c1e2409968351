"""extract -> train-gate -> evaluate, end to end on RefShapes with the test-sized model."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from deris_rerank import Pipeline, cli
from deris_rerank.data import RefShapes
from deris_rerank.transforms import resize_mask_nearest
from deris_rerank.rerank.cache import read_cache
from deris_rerank.rerank.files import load_gate
from deris_rerank.workflow.extract import mask_overlap
from deris_rerank.rerank.gate_data import load_gate_data

SMALL = ["--hidden-dim", "32", "--n-layers", "1", "--n-heads", "4", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16"]


def extract(tiny_model_dir, cache, split, images, seed, *extra):
    return cli.main(["extract", "--data", "refshapes", "--split", split, "--refshapes-images", str(images),
                     "--refshapes-seed", str(seed), "--refshapes-size", "128", "--out", str(cache), "--quiet",
                     "--deris", str(tiny_model_dir / "deris"), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    for split, images, seed in (("train", 10, 1), ("tune", 6, 2), ("val", 6, 3)):
        assert extract(tiny_model_dir, cache, split, images, seed, "--shard-size", "8") == 0
    return cache


def extract_batch_of(tiny_model_dir, samples, index):
    """The pipeline's candidate batch holding pair `index` of the `caches` split `samples`, and its row.

    It is the model run extract made for the pair (the first shard's 8 pairs, grouped by image,
    batch size 8): float32 results are bit-exact only for the same batch composition (a pair run
    alone differs by ~1e-6 under ATEN_CPU_CAPABILITY=default).
    """
    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    shard = [(s.image, s.text, s.image_id or s.id) for s in samples[:8]]
    batch = next(b for b in pipe.iter_candidates(shard, batch_size=8) if index in b.indices)
    return batch, batch.indices.index(index)


def test_cache_fields_and_ious_match_a_direct_computation(caches, tiny_model_dir):
    tensors, ids, provenance = read_cache([caches / "val"])
    samples = RefShapes("val", num_images=6, seed=3, image_size=(128, 128))
    assert ids == [s.id for s in samples] and len(provenance) == 1
    assert provenance[0]["iou_protocol"] == "384" and len(provenance[0]["checkpoint_sha256"]) == 64
    p, n = len(ids), 10
    assert tensors["query_feat"].shape == (p, n, 64) and tensors["det_scores"].shape == (p, n)
    assert tensors["grid_mean_16"].shape == (p, n, 256) and tensors["boundary_4"].shape == (p, n)
    assert tensors["oracle_idx"].tolist() == tensors["query_ious"].argmax(1).tolist()
    # recompute pair 2 by hand through the pipeline, in the model run extract made for it
    sample = samples[2]
    batch, row = extract_batch_of(tiny_model_dir, samples, 2)
    binary = batch.candidates.binary_masks()[row]
    target = resize_mask_nearest(torch.from_numpy(sample.target_mask()), binary.shape[-2:])
    iou, inter, union = mask_overlap(binary, target)
    assert np.allclose(tensors["query_ious"][2], iou.numpy(), atol=1e-6)
    assert tensors["query_inter"][2].tolist() == inter.tolist() and tensors["query_union"][2].tolist() == union.tolist()
    assert np.allclose(tensors["det_scores"][2], batch.candidates.scores[row].numpy(), atol=1e-6)


def test_cache_holds_the_text_aware_fields(caches, tiny_model_dir):
    tensors, _, _ = read_cache([caches / "val"])
    p, t = len(tensors["det_scores"]), 20
    assert tensors["refer_logits"].shape == (p, 10, 2) and tensors["cognition_feat"].shape == (p, 10, 64)
    assert tensors["text_feat"].shape == (p, t, 64) and tensors["text_padding"].shape == (p, t)
    logits = torch.from_numpy(tensors["refer_logits"])
    assert np.allclose(logits.softmax(-1)[..., 0].numpy(), tensors["det_scores"], atol=1e-6)
    keep = 1.0 - tensors["text_padding"].astype(np.float32)
    assert (keep.sum(1) >= 1).all() and (keep[:, 0] == 1).all()  # every expression has tokens, left-aligned
    pooled = (tensors["text_feat"] * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
    assert np.allclose(tensors["text_pooled"], pooled, atol=1e-5)
    # the same tensors as the model's own outputs for pair 0, in the model run extract made for it
    batch, row = extract_batch_of(tiny_model_dir, RefShapes("val", num_images=6, seed=3, image_size=(128, 128)), 0)
    text = batch.candidates.text
    assert np.allclose(tensors["cognition_feat"][0], text.cognition_embed[row].numpy(), atol=1e-6)
    assert np.allclose(tensors["text_feat"][0], text.text_feat[row].numpy(), atol=1e-6)
    assert tensors["text_padding"][0].tolist() == text.text_padding[row].int().tolist()


def test_extract_resumes_and_splits_work_between_workers(caches, tiny_model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert extract(tiny_model_dir, caches, "train", 10, 1, "--shard-size", "8") == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == len(RefShapes("train", num_images=10, seed=1))
    for worker in ("0/2", "1/2"):
        assert extract(tiny_model_dir, tmp_path, "train", 10, 1, "--shard-size", "8", "--worker", worker) == 0
    whole, whole_ids, _ = read_cache([caches / "train"])
    parts, part_ids, _ = read_cache([tmp_path / "train"])
    assert part_ids == whole_ids
    for key, value in whole.items():
        assert np.allclose(parts[key], value, atol=1e-6), key


def test_train_gate_is_deterministic_and_tunes_tau_on_the_tuning_split(caches, tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        code = cli.main(["train-gate", "--train", str(caches / "train"), "--tune", str(caches / "tune"),
                         "--out", str(tmp_path / name), "--device", "cpu", "--quiet", *SMALL])
        assert code == 0
        runs.append(json.loads(capsys.readouterr().out))
    a, b = load_gate(tmp_path / "a.safetensors"), load_gate(tmp_path / "b.safetensors")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert runs[0]["rule"] == runs[1]["rule"] and runs[0]["tune_pairs"] == len(RefShapes("tune", num_images=6, seed=2))
    assert a.config.hidden_dim == 32 and a.config.query_dim == 64
    # tau is the best on the tuning split: no other tau on the grid does better there
    from deris_rerank.rerank.gate_data import gate_outputs
    from deris_rerank.workflow.train_gate import TAU_GRID, delta_full
    from deris_rerank.rerank.decision import apply_rule
    import dataclasses

    tune = load_gate_data([caches / "tune"])
    outputs = gate_outputs(a, tune)
    best = delta_full(tune, apply_rule(a.rule, *outputs).selected)
    assert best == pytest.approx(runs[0]["tune_delta_full"])
    assert all(delta_full(tune, apply_rule(dataclasses.replace(a.rule, tau=t), *outputs).selected) <= best + 1e-9 for t in TAU_GRID)


def test_feature_ablations(caches, tmp_path, capsys):
    for features in ("base", "grid16"):
        assert cli.main(["train-gate", "--train", str(caches / "train"), "--tune", str(caches / "tune"), "--out",
                         str(tmp_path / features), "--device", "cpu", "--quiet", "--features", features, *SMALL]) == 0
    capsys.readouterr()
    base, single = load_gate(tmp_path / "base.safetensors"), load_gate(tmp_path / "grid16.safetensors")
    assert not base.config.use_grid and single.config.grid_scales == (16,)
    data = load_gate_data([caches / "val"])
    changed = data.grid.clone()
    changed[..., :162] = torch.rand_like(changed[..., :162])  # the 4x4 and 8x8 fields
    inputs = (data.query_feat, data.scores, data.mask_stats)
    assert torch.equal(single.decide(*inputs, data.grid).rank, single.decide(*inputs, changed).rank)
    assert not torch.equal(single.decide(*inputs, data.grid).rank, single.decide(*inputs, changed[..., torch.randperm(675)]).rank)


def test_evaluate_writes_report_and_numbers_match_the_cache(caches, tmp_path, capsys):
    assert cli.main(["train-gate", "--train", str(caches / "train"), "--tune", str(caches / "tune"), "--out",
                     str(tmp_path / "gate"), "--device", "cpu", "--quiet", *SMALL]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--cache", str(caches / "val"), str(caches / "tune"), "--gate",
                     str(tmp_path / "gate.safetensors"), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "Protocol:" in table and "| val |" in table and "| overall |" in table
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for name in ("metrics.md", "roc.png", "coverage_risk.png", "per_split.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    tensors, _, _ = read_cache([caches / "val"])
    default = tensors["det_scores"].argmax(1)
    q0 = 100 * tensors["query_ious"][np.arange(len(default)), default].mean()
    assert report["splits"]["val"]["q0_miou"] == pytest.approx(q0, abs=1e-4)
    assert report["splits"]["val"]["oracle_miou"] == pytest.approx(100 * tensors["query_ious"].max(1).mean(), abs=1e-4)
    assert report["overall"]["pairs"] == report["splits"]["val"]["pairs"] + report["splits"]["tune"]["pairs"]
    assert report["protocol"]["iou"] == ["384"] and report["protocol"]["gate"]["tau"] is not None
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())["overall"]
    assert alone["delta_full"] == 0 and alone["switch_rate"] == 0


def test_extract_refuses_to_mix_shards_of_other_settings_or_data(tiny_model_dir, tmp_path, capsys):
    assert extract(tiny_model_dir, tmp_path, "train", 4, 1, "--shard-size", "4") == 0
    shards = sorted((tmp_path / "train").glob("shard_*.safetensors"))
    before = {p.name: p.read_bytes() for p in shards}
    for change, needle in ((["--query-source", "cognition"], "query_source perception -> cognition"),
                           ([], "source.refshapes.seed 1 -> 2")):
        capsys.readouterr()
        seed = 2 if not change else 1
        assert extract(tiny_model_dir, tmp_path, "train", 8, seed, "--shard-size", "4", *change) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deris-rerank: error:")]
        assert len(errors) == 1 and needle in errors[0] and "--overwrite" in errors[0]
        assert {p.name: p.read_bytes() for p in sorted((tmp_path / "train").glob("shard_*"))} == before
    assert extract(tiny_model_dir, tmp_path, "train", 4, 2, "--shard-size", "4", "--overwrite") == 0
    _, ids, provenance = read_cache([tmp_path / "train"])
    assert ids == [s.id for s in RefShapes("train", num_images=4, seed=2)]
    assert len(provenance) == 1 and provenance[0]["source"]["refshapes"]["seed"] == 2


def pipeline_and_cache_decisions(model_dir, gate_path, caches, pairs: int):
    """(the pipeline's Results, the re-ranker's decision on the cached features) for the first
    `pairs` pairs of the `val` cache (the same RefShapes pairs), both with tau 0."""
    samples = RefShapes("val", num_images=6, seed=3, image_size=(128, 128))
    pipe = Pipeline(deris=model_dir / "deris", gate=gate_path, device="cpu", tau=0.0)
    results = pipe.batch([(s.image, s.text) for s in samples][:pairs])
    data = load_gate_data([caches / "val"])
    rows = slice(0, pairs)
    decision = load_gate(gate_path, tau=0.0).decide(
        data.query_feat[rows], data.scores[rows], data.mask_stats[rows], data.grid[rows], text=data.text.select(rows))
    return results, decision


def test_calibrated_reranker_trains_evaluates_and_runs_in_the_pipeline(caches, tiny_model_dir, tmp_path, capsys):
    from deris_rerank.rerank.calibrated import CalibratedReranker

    args = ["train-gate", "--arch", "calibrated", "--train", str(caches / "train"), "--tune", str(caches / "tune"),
            "--device", "cpu", "--quiet", *SMALL]
    assert cli.main([*args, "--out", str(tmp_path / "cal")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["operating_points"]) == {"tuned", "conservative"} and out["rule"] == out["operating_points"]["tuned"]
    assert out["tuned_tune_harmful"] <= 5.0 and out["conservative_tune_harmful"] <= 1.0
    sidecar = json.loads((tmp_path / "cal.json").read_text())
    assert sidecar["format"] == "deris-rerank-calibrated" and sidecar["training"]["hidden_dim"] == 32
    reranker = load_gate(tmp_path / "cal.safetensors")
    assert isinstance(reranker, CalibratedReranker) and reranker.config.hidden_dim == 32
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--gate", str(tmp_path / "cal.safetensors"),
                     "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["protocol"]["gate"]["flavour"] == "calibrated" and "failure_auc" in report["overall"]
    # the pipeline passes the expression's features on, and decides as the cache-based evaluation does
    results, decision = pipeline_and_cache_decisions(tiny_model_dir, tmp_path / "cal.safetensors", caches, 4)
    assert [r.switched for r in results] == decision.switched.tolist()
    assert np.allclose([r.p_fail for r in results], decision.p_fail.numpy(), atol=1e-4)
    for b, r in enumerate(results):  # the explanation: scores by rank, as the decision's per-slot values
        assert np.allclose(r.calibrated_scores, decision.calibrated[b, r.slots].numpy(), atol=1e-4)
        assert np.allclose(r.rerank_scores, decision.rank[b, r.slots].numpy(), atol=1e-4) and r.rerank_scores[0] == 0
        assert r.to_json()["calibrated_scores"] == r.calibrated_scores


def test_operating_points_are_reported_and_selectable(caches, tiny_model_dir, tmp_path, capsys):
    from deris_rerank.errors import CheckpointError, InputError

    args = ["train-gate", "--arch", "calibrated", "--train", str(caches / "train"), "--tune", str(caches / "tune"),
            "--device", "cpu", "--quiet", *SMALL, "--out", str(tmp_path / "cal")]
    assert cli.main(args) == 0
    capsys.readouterr()
    reranker = load_gate(tmp_path / "cal.safetensors")
    reranker.operating_points["conservative"] = dataclasses.replace(reranker.rule, tau=0.97, margin_pred=4.0)  # distinct from tuned
    from deris_rerank.rerank.files import save_calibrated

    save_calibrated(reranker, tmp_path / "cal")
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--gate", str(tmp_path / "cal.safetensors"),
                     "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    points = report["operating_points"]
    assert set(points) == {"tuned", "conservative"} and points["conservative"]["rule"]["tau"] == 0.97
    assert points["tuned"]["selected_miou"] == report["overall"]["selected_miou"]  # the rule in use is "tuned"
    assert "| conservative | 0.97 | 4 |" in (tmp_path / "report" / "metrics.md").read_text()
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--gate", str(tmp_path / "cal.safetensors"),
                     "--operating-point", "conservative", "--out", str(tmp_path / "report2")]) == 0
    again = json.loads((tmp_path / "report2" / "metrics.json").read_text())
    assert again["overall"]["selected_miou"] == points["conservative"]["selected_miou"]
    # the pipeline: from the file or a built object, tau still overriding
    deris = tiny_model_dir / "deris"
    from_file = Pipeline(deris=deris, gate=tmp_path / "cal.safetensors", device="cpu", operating_point="conservative")
    assert from_file.gate.rule == reranker.operating_points["conservative"]
    built = Pipeline(deris=deris, gate=load_gate(tmp_path / "cal.safetensors"), device="cpu", operating_point="conservative", tau=0.5)
    assert built.gate.rule == dataclasses.replace(reranker.operating_points["conservative"], tau=0.5)
    with pytest.raises(CheckpointError, match="no operating point 'bold'.*tuned"):
        Pipeline(deris=deris, gate=load_gate(tmp_path / "cal.safetensors"), device="cpu", operating_point="bold")
    with pytest.raises(CheckpointError, match="Venice-H1 gate.*no operating point"):
        Pipeline(deris=deris, gate=tiny_model_dir / "gate.safetensors", device="cpu", operating_point="conservative")
    with pytest.raises(InputError, match="runs without one"):
        Pipeline(deris=deris, gate=False, device="cpu", operating_point="conservative")
    sample = RefShapes("val", num_images=1, seed=3, image_size=(128, 128))[0]
    image = tmp_path / "scene.png"
    Image.fromarray(sample.load_image()).save(image)
    code = cli.main(["segment", "--image", str(image), "--text", sample.text, "--deris", str(deris), "--gate",
                     str(tmp_path / "cal.safetensors"), "--operating-point", "conservative", "--device", "cpu",
                     "--out", str(tmp_path / "seg")])
    assert code == 0
    code = cli.main(["segment", "--image", str(image), "--text", sample.text, "--deris", str(deris), "--gate",
                     str(tmp_path / "cal.safetensors"), "--operating-point", "bold", "--device", "cpu", "--out", str(tmp_path / "seg2")])
    err = capsys.readouterr().err
    assert code == 2 and "no operating point 'bold'" in err and "Traceback" not in err


def test_retune_repicks_the_points_train_gate_picked_and_keeps_the_weights(caches, tiny_model_dir, tmp_path, capsys):
    from deris_rerank.rerank.files import save_calibrated

    assert cli.main(["train-gate", "--arch", "calibrated", "--train", str(caches / "train"), "--tune", str(caches / "tune"),
                     "--device", "cpu", "--quiet", *SMALL, "--out", str(tmp_path / "cal")]) == 0
    trained = load_gate(tmp_path / "cal.safetensors")
    picked, points = trained.rule, dict(trained.operating_points)
    trained.rule = dataclasses.replace(picked, tau=0.123, margin_pred=7.0)  # points that train-gate would not pick
    trained.operating_points = {name: trained.rule for name in points}
    save_calibrated(trained, tmp_path / "moved", extra={"training": {"hidden_dim": 32}})
    capsys.readouterr()
    assert cli.main(["retune", "--gate", str(tmp_path / "moved.safetensors"), "--tune", str(caches / "tune"),
                     "--out", str(tmp_path / "back")]) == 0
    printed = json.loads(capsys.readouterr().out)
    back = load_gate(tmp_path / "back.safetensors")
    assert back.rule == picked and back.operating_points == points
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in back.state_dict().items())
    sidecar = json.loads((tmp_path / "back.json").read_text())
    assert sidecar["training"] == {"hidden_dim": 32} and sidecar["retuning"]["harm_confidence"] == 0.95
    assert sidecar["tuning"] == {k: v for k, v in printed.items() if k not in ("gate", "rule", "retrieval", "operating_points")}
    # no harmful switch allowed at 95 %: the points switch nowhere on the tuning split
    assert cli.main(["retune", "--gate", str(tmp_path / "moved.safetensors"), "--tune", str(caches / "tune"),
                     "--max-harmful", "0", "--conservative-harmful", "0", "--out", str(tmp_path / "none")]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["tuned_tune_switch"] == 0 and strict["conservative_tune_switch"] == 0
    for flag, value in (("--max-harmful", "-1"), ("--conservative-harmful", "101"), ("--harm-confidence", "1")):
        assert cli.main(["retune", "--gate", str(tmp_path / "moved.safetensors"), "--tune", str(caches / "tune"),
                         flag, value, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err and not (tmp_path / "bad.safetensors").exists()
    # a Venice-H1 gate has no operating points to re-pick: one line, exit 2
    capsys.readouterr()
    assert cli.main(["retune", "--gate", str(tiny_model_dir / "gate.safetensors"), "--tune", str(caches / "tune"),
                     "--out", str(tmp_path / "venice")]) == 2
    err = capsys.readouterr().err
    assert "Venice-H1 gate" in err and "calibrated" in err and "Traceback" not in err


def test_text_aware_training_on_an_old_cache_fails_with_one_line(caches, tmp_path, capsys):
    from deris_rerank.rerank.cache import write_shard
    from deris_rerank.rerank.gate_data import CACHE_TEXT_FIELDS

    tensors, ids, provenance = read_cache([caches / "train"])
    old = {k: torch.from_numpy(v) for k, v in tensors.items() if k not in (*CACHE_TEXT_FIELDS, "text_pooled")}
    write_shard(tmp_path / "old" / "shard_00000.safetensors", old, ids, provenance[0])
    assert load_gate_data([tmp_path / "old"]).text is None  # still readable (the Venice-H1 gate trains on it)
    code = cli.main(["train-gate", "--arch", "calibrated", "--train", str(tmp_path / "old"), "--tune", str(caches / "tune"),
                     "--out", str(tmp_path / "cal"), "--device", "cpu", "--quiet", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "lacks the text-aware fields" in err and "re-extract" in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_several_gates_writes_the_ablation_table(caches, tmp_path, capsys):
    common = ["--train", str(caches / "train"), "--tune", str(caches / "tune"), "--device", "cpu", "--quiet", *SMALL]
    assert cli.main(["train-gate", *common, "--out", str(tmp_path / "venice")]) == 0
    assert cli.main(["train-gate", "--arch", "calibrated", *common, "--out", str(tmp_path / "cal")]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--gate", str(tmp_path / "venice.safetensors"),
                     str(tmp_path / "cal.safetensors"), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "ablation.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "re-ranker" and rows[1] == "Query-0 (DeRIS)" and rows[2] == "venice" and rows[-1] == "oracle"
    assert "cal" in rows and table.split("\n\n", 1)[1] in capsys.readouterr().out
    data = load_gate_data([caches / "val"])
    q0 = 100 * float(data.ious[torch.arange(len(data)), data.default_index].mean())
    assert f"| Query-0 (DeRIS) | {q0:.2f} |" in table
