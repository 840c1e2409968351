"""GRES end to end with the test-sized model: gres-mode caches, train-gate --sets, evaluate's set table,
and a pipeline that answers with sets."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deris_rerank import Pipeline, cli
from deris_rerank.bitmasks import unpack_masks
from deris_rerank.data import RefShapes
from deris_rerank.rerank.cache import read_cache
from deris_rerank.rerank.files import load_gate
from deris_rerank.transforms import resize_mask_nearest
from deris_rerank.workflow.extract import SET_MASK_SIZE

SMALL = ["--hidden-dim", "32", "--n-layers", "1", "--n-heads", "4", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16"]


def extract(tiny_model_dir, cache, split, images, seed):
    return cli.main(["extract", "--data", "refshapes", "--split", split, "--refshapes-images", str(images),
                     "--refshapes-seed", str(seed), "--refshapes-size", "128", "--refshapes-mode", "gres",
                     "--out", str(cache), "--quiet", "--deris", str(tiny_model_dir / "deris"), "--device", "cpu"])


@pytest.fixture(scope="module")
def gres_caches(tiny_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gres_cache")
    for split, images, seed in (("train", 12, 1), ("tune", 8, 2)):
        assert extract(tiny_model_dir, cache, split, images, seed) == 0
    return cache


def test_gres_cache_carries_areas_counts_instances_and_packed_masks(gres_caches, tiny_model_dir):
    tensors, ids, provenance = read_cache([gres_caches / "tune"])
    samples = RefShapes("tune", num_images=8, seed=2, image_size=(128, 128), mode="gres")
    assert ids == [s.id for s in samples] and provenance[0]["set_mask_size"] == SET_MASK_SIZE
    assert tensors["num_targets"].tolist() == [s.num_targets for s in samples]
    assert {0, 1}.issubset(set(tensors["num_targets"].tolist())) and max(tensors["num_targets"]) >= 2
    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    p = int(np.flatnonzero(tensors["num_targets"] >= 2)[0])
    sample = samples[p]
    # in the model run extract made for it (batch size 8, pairs grouped by image): float32 is bit-exact only for the same batch
    pairs = [(s.image, s.text, s.image_id) for s in samples]
    batch = next(b for b in pipe.iter_candidates(pairs, batch_size=8) if p in b.indices)
    binary = batch.candidates.binary_masks()[batch.indices.index(p)]
    target = resize_mask_nearest(torch.from_numpy(sample.target_mask()), binary.shape[-2:])
    assert tensors["query_area"][p].tolist() == binary.sum(dim=(-2, -1)).tolist()
    assert tensors["target_area"][p] == int(target.sum())
    small = (SET_MASK_SIZE, SET_MASK_SIZE)
    assert np.array_equal(unpack_masks(tensors["query_masks"][p], small), resize_mask_nearest(binary, small).numpy())
    assert np.array_equal(unpack_masks(tensors["target_mask_packed"][p], small),
                          resize_mask_nearest(torch.from_numpy(sample.target_mask()), small).numpy())
    instances = resize_mask_nearest(torch.from_numpy(sample.instance_masks()), binary.shape[-2:])
    inter = (binary[:, None] & instances[None]).sum(dim=(-2, -1))
    union = (binary[:, None] | instances[None]).sum(dim=(-2, -1))
    ious = inter / union.clamp(min=1)
    best = torch.where(ious.max(dim=1).values > 0, ious.argmax(dim=1), torch.full((10,), -1))
    assert tensors["query_instance"][p].tolist() == best.tolist()
    assert np.allclose(tensors["query_instance_iou"][p], ious.max(dim=1).values.numpy(), atol=1e-6)


def test_set_reranker_trains_evaluates_and_answers_with_sets(gres_caches, tiny_model_dir, tmp_path, capsys):
    common = ["--train", str(gres_caches / "train"), "--tune", str(gres_caches / "tune"), "--device", "cpu", "--quiet", *SMALL]
    assert cli.main(["train-gate", "--arch", "calibrated", "--sets", "--set-existence", "--set-overlap", *common,
                     "--out", str(tmp_path / "set")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["set_operating_points"]) == {"tuned", "conservative"} and "tuned_set_tune_giou" in printed
    gate = load_gate(tmp_path / "set.safetensors")
    assert gate.config.sets and gate.config.set_inputs == ("existence", "overlap")
    assert gate.set_rule.union_threshold == 0.7  # deferring answers with the caches' DeRIS threshold
    if printed["tuned_set_within_budget"]:
        assert printed["tuned_set_tune_harmful"] <= 8.0
    assert cli.main(["evaluate", "--cache", str(gres_caches / "tune"), "--gate", str(tmp_path / "set.safetensors"),
                     "--tune", str(gres_caches / "train"), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    for row in ("| DeRIS union (threshold", "| DeRIS union, best on tune", "| Query-0 |", "| set |", "| oracle set |"):
        assert row in table
    rows = {r["name"]: r for r in json.loads((tmp_path / "report" / "metrics.json").read_text())["sets"]["rows"]}
    assert rows["oracle set"]["giou"] >= max(r["giou"] for r in rows.values())
    assert rows["DeRIS union (threshold 0.7)"]["harmful_rate"] == 0.0  # DeRIS's own answer is the reference

    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=tmp_path / "set.safetensors", device="cpu")
    assert pipe.answer == "set"
    samples = RefShapes("tune", num_images=8, seed=2, image_size=(128, 128), mode="gres")
    results = pipe.batch([(s.image, s.text) for s in samples])
    for result in results:
        union = result.candidates[result.selected_ranks].any(axis=0) if result.selected_ranks else np.zeros_like(result.mask)
        assert np.array_equal(result.mask, union) and result.answer == "set" and 0 <= result.p_no_target <= 1
        assert result.to_json()["selected_set"] == result.selected_ranks
    single = Pipeline(deris=tiny_model_dir / "deris", gate=tmp_path / "set.safetensors", device="cpu", answer="single")
    assert all(r.object_count == 1 for r in single.batch([(s.image, s.text) for s in samples[:4]]))


def test_train_gate_init_starts_from_a_trained_reranker_and_refuses_another_shape(gres_caches, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["train-gate", "--arch", "calibrated", "--sets", "--train", str(gres_caches / "train"), "--tune",
              str(gres_caches / "tune"), "--device", "cpu", "--quiet", *SMALL]
    assert cli.main([*common, "--out", str(tmp_path / "first")]) == 0
    assert cli.main([*common, "--seed", "7", "--lr", "0", "--init", str(tmp_path / "first.safetensors"), "--out", str(tmp_path / "kept")]) == 0
    first, kept = load_file(tmp_path / "first.safetensors"), load_file(tmp_path / "kept.safetensors")
    assert first.keys() == kept.keys() and all(torch.equal(first[k], kept[k]) for k in first)  # lr 0: the init's weights
    assert cli.main([*common, "--seed", "7", "--out", str(tmp_path / "fresh")]) == 0
    fresh = load_file(tmp_path / "fresh.safetensors")
    assert not all(torch.equal(first[k], fresh[k]) for k in first)
    capsys.readouterr()
    wider = [*common[:-len(SMALL)], *SMALL[:1], "64", *SMALL[2:]]
    assert cli.main([*wider, "--init", str(tmp_path / "first.safetensors"), "--out", str(tmp_path / "wide")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "hidden_dim" in error and not (tmp_path / "wide.safetensors").exists()


def test_deris_union_is_the_set_answer_without_a_reranker(tiny_model_dir):
    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu", answer="set")
    sample = RefShapes("x", num_images=1, seed=4, image_size=(128, 128), mode="gres")[0]
    result = pipe(sample.image, sample.text)
    assert np.array_equal(result.mask, result.deris_mask) and not result.switched
    assert result.selected_ranks == [k for k, score in enumerate(result.scores) if score > pipe.config.score_threshold]


def test_a_set_reranker_on_caches_without_the_set_fields_fails_with_one_line(gres_caches, tmp_path, capsys):
    old = tmp_path / "old" / "train"
    old.mkdir(parents=True)
    for shard in sorted((gres_caches / "train").glob("shard_*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            kept = {k: handle.get_tensor(k) for k in handle.keys() if k not in ("query_area", "num_targets")}
            save_file(kept, str(old / shard.name), metadata=handle.metadata())
    code = cli.main(["train-gate", "--arch", "calibrated", "--sets", "--train", str(old), "--tune", str(gres_caches / "tune"),
                     "--out", str(tmp_path / "g"), "--device", "cpu", "--quiet", *SMALL])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "lacks the set fields" in error and "re-extract" in error


def test_batch_records_set_answers_and_refuses_to_mix_answer_kinds(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    sample = RefShapes("x", num_images=1, seed=4, image_size=(128, 128), mode="gres")[0]
    Image.fromarray(sample.load_image()).save(folder / "scene.png")
    common = ["batch", "--images", str(folder), "--text", sample.text, "--out", str(tmp_path / "out"), "--quiet",
              "--deris", str(tiny_model_dir / "deris"), "--no-gate", "--device", "cpu"]
    assert cli.main([*common, "--answer", "set"]) == 0
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert record["answer"] == "set" and record["objects"] == len(record["selected_set"])
    assert json.loads((tmp_path / "out" / "run.json").read_text())["answer"] == "set"
    capsys.readouterr()
    assert cli.main([*common, "--answer", "single"]) == 2
    assert "answer set -> single" in capsys.readouterr().err
