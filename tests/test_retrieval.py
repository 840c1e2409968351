"""Retrieval augmentation of the calibrated re-ranker on hand-made inputs: lookup, permutation,
zero weight, files (new and old), and the CLI on the workflow's tiny caches."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_calibrated import N, inputs, reranker
from test_workflow import SMALL, caches, pipeline_and_cache_decisions  # noqa: F401  (caches: the workflow's tiny caches, a module fixture)

from deris_rerank import Pipeline, cli
from deris_rerank.data import RefShapes
from deris_rerank.errors import CheckpointError, InputError
from deris_rerank.rerank.files import load_gate, save_calibrated
from deris_rerank.rerank.retrieval import RetrievalConfig, RetrievalMemory, memory_values, retrieval_keys, subsample
from deris_rerank.rerank.text_context import TextContext
from deris_rerank.rerank.gate_data import load_gate_data


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def own_memory(model, args, text, weight, k=4, keys="cand_text", half=False):
    """A memory of the candidates of these very inputs, valued by made-up gains."""
    with torch.no_grad():
        cand, pooled = model.encode(*args, text)
    flat = retrieval_keys(cand, pooled, keys).flatten(0, 1)
    flat = flat.half().float() if half else flat
    values = torch.linspace(-0.5, 0.9, flat.shape[0])
    return RetrievalMemory(flat, values, RetrievalConfig(k=k, temperature=0.05, weight=weight, keys=keys))


def test_memory_holding_the_query_returns_its_own_value_with_k1():
    keys, values = unit(40, 8), torch.arange(40.0) / 40
    memory = RetrievalMemory(keys, values, RetrievalConfig(k=1))
    rows = torch.tensor([[3, 17, 0], [39, 3, 22]])  # [B=2, N=3] entries used as queries
    assert torch.equal(memory.lookup(keys[rows]), values[rows])
    # with k > 1 the neighbours mix in (the test above can fail): a softmax-weighted mean of k values
    mixed = RetrievalMemory(keys, values, RetrievalConfig(k=5, temperature=1.0)).lookup(keys[rows])
    assert not torch.allclose(mixed, values[rows])
    sims = keys[rows] @ keys.t()
    top, index = sims.topk(5, dim=-1)
    assert torch.allclose(mixed, (top.softmax(-1) * values[index]).sum(-1), atol=1e-6)


def test_lookup_in_chunks_equals_one_matmul(monkeypatch):
    import deris_rerank.rerank.retrieval as retrieval

    keys, values = unit(50, 6, seed=1), torch.rand(50)
    memory = RetrievalMemory(keys, values, RetrievalConfig(k=3))
    query = unit(4, 10, 6, seed=2)
    whole = memory.lookup(query)
    monkeypatch.setattr(retrieval, "SIMILARITY_BUDGET", 50 * 7)  # 7 rows per matmul
    assert torch.allclose(memory.lookup(query), whole, atol=1e-6) and whole.shape == (4, 10)


def test_keys_values_and_subsample():
    cand, pooled = torch.randn(2, 3, 4), torch.randn(2, 4)
    joined = retrieval_keys(cand, pooled, "cand_text")
    assert joined.shape == (2, 3, 8) and torch.allclose(joined.norm(dim=-1), torch.ones(2, 3), atol=1e-6)
    assert torch.allclose(retrieval_keys(cand, pooled, "cand").norm(dim=-1), torch.ones(2, 3), atol=1e-6)
    ious = torch.tensor([[0.2, 0.9, 0.5]])
    assert torch.allclose(memory_values(ious, torch.tensor([2]), "gain"), torch.tensor([[-0.3, 0.4, 0.0]]))
    assert torch.equal(memory_values(ious, torch.tensor([2]), "iou"), ious)
    drawn = subsample(100, 10, seed=3)
    assert len(drawn) == 10 and len(set(drawn.tolist())) == 10 and torch.equal(drawn, subsample(100, 10, seed=3))
    assert torch.equal(subsample(5, 0, 0), torch.arange(5)) and torch.equal(subsample(5, 9, 0), torch.arange(5))
    with pytest.raises(InputError, match="weight must be >= 0"):
        RetrievalConfig(weight=-1.0)


def test_permuting_candidates_permutes_the_retrieved_values():
    args, text = inputs(seed=1)
    model = reranker(w_cal=1.0)
    model.attach_memory(own_memory(model, args, text, weight=2.0))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    moved_args = tuple(x[:, perm] for x in args)
    moved_text = TextContext(text.refer_logits[:, perm], text.cognition_embed[:, perm], text.text_feat, text.text_padding)
    base, moved = model.outputs(*args, text), model.outputs(*moved_args, moved_text)
    assert torch.allclose(moved.retrieved, base.retrieved[:, perm], atol=1e-5)
    assert torch.allclose(moved.fused, base.fused[:, perm], atol=1e-5)  # the ensemble
    a, b = model.decide(*args, text=text), model.decide(*moved_args, text=moved_text)
    assert torch.equal(perm[b.selected], a.selected) and torch.allclose(b.retrieved, a.retrieved[:, perm], atol=1e-5)


def test_zero_weight_reproduces_the_decisions_without_memory_exactly():
    args, text = inputs(seed=3)
    model = reranker(w_cal=1.0)
    alone = model.decide(*args, text=text)
    assert alone.retrieved is None
    model.attach_memory(own_memory(model, args, text, weight=0.0))
    zero = model.decide(*args, text=text)
    for name in ("p_fail_logit", "p_fail", "rank", "selected", "switched"):
        assert torch.equal(getattr(zero, name), getattr(alone, name)), name
    assert zero.retrieved is not None and zero.retrieved.shape == (len(args[0]), N)
    # a heavy weight follows the memory instead (the test above can fail): here, its own values
    model.attach_memory(own_memory(model, args, text, weight=1000.0, k=1))
    heavy = model.decide(*args, text=text)
    assert torch.equal(heavy.retrieved, torch.linspace(-0.5, 0.9, len(args[0]) * N).view(-1, N))
    assert not torch.equal(heavy.selected, alone.selected)


def test_round_trip_keeps_the_float16_memory_and_the_decisions(tmp_path):
    args, text = inputs(seed=4)
    model = reranker(w_cal=1.0)
    model.attach_memory(own_memory(model, args, text, weight=3.0, half=True))
    save_calibrated(model, tmp_path / "cal")
    with safe_open(str(tmp_path / "cal.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("memory.keys").dtype == torch.float16 and handle.get_tensor("memory.values").dtype == torch.float32
    sidecar = json.loads((tmp_path / "cal.json").read_text())
    assert sidecar["format"] == "deris-rerank-calibrated" and sidecar["retrieval"]["weight"] == 3.0
    assert sidecar["retrieval"]["size"] == len(args[0]) * N and sidecar["retrieval"]["k"] == 4
    loaded = load_gate(tmp_path / "cal.safetensors")
    assert loaded.memory is not None and loaded.memory.config == model.memory.config
    assert torch.equal(loaded.memory.keys, model.memory.keys) and loaded.memory.keys.dtype == torch.float32
    a, b = model.decide(*args, text=text), loaded.decide(*args, text=text)
    assert torch.equal(a.selected, b.selected) and torch.equal(a.retrieved, b.retrieved) and torch.equal(a.rank, b.rank)
    # saving again writes the same float16 keys
    save_calibrated(loaded, tmp_path / "again")
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as one, safe_open(str(tmp_path / "cal.safetensors"), framework="pt") as two:
        assert torch.equal(one.get_tensor("memory.keys"), two.get_tensor("memory.keys"))


def test_a_file_without_memory_loads_and_behaves_as_before(tmp_path):
    args, text = inputs(seed=5)
    model = reranker(w_cal=1.0)
    save_calibrated(model, tmp_path / "old")
    sidecar = json.loads((tmp_path / "old.json").read_text())
    assert "retrieval" not in sidecar
    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as handle:
        assert not any(k.startswith("memory.") for k in handle.keys())
    loaded = load_gate(tmp_path / "old.safetensors")
    assert loaded.memory is None
    a, b = model.decide(*args, text=text), loaded.decide(*args, text=text)
    assert torch.equal(a.selected, b.selected) and torch.equal(a.rank, b.rank) and b.retrieved is None
    # a .json that announces a memory the weights lack is refused in one line
    (tmp_path / "old.json").write_text(json.dumps({**sidecar, "retrieval": {"k": 4}}))
    with pytest.raises(CheckpointError, match="no memory.keys"):
        load_gate(tmp_path / "old.safetensors")


def test_cli_trains_a_reranker_with_memory_and_adds_one_to_an_existing_one(caches, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    common = ["--train", str(caches / "train"), "--tune", str(caches / "tune")]
    assert cli.main(["train-gate", "--arch", "calibrated", *common, "--device", "cpu", "--quiet", *SMALL,
                     "--retrieval", "4", "--memory-size", "50", "--out", str(tmp_path / "ret")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_size"] == 50 and out["retrieval_weight"] in [float(w) for w in out["retrieval_sweep"]]
    sidecar = json.loads((tmp_path / "ret.json").read_text())
    assert sidecar["retrieval"]["k"] == 4 and sidecar["retrieval"]["size"] == 50 and sidecar["retrieval"]["source"] == "train"
    assert sidecar["training"]["retrieval"] == 4 and sidecar["training"]["memory_size"] == 50
    assert sidecar["retrieval"]["weight"] == out["retrieval_weight"]
    reranker = load_gate(tmp_path / "ret.safetensors")
    assert reranker.memory.size == 50 and reranker.memory.keys.shape[1] == 2 * 32  # cand_text keys: 2 x hidden
    # the same network without its memory: the same training run, so the same weights
    assert cli.main(["train-gate", "--arch", "calibrated", *common, "--device", "cpu", "--quiet", *SMALL,
                     "--out", str(tmp_path / "plain")]) == 0
    plain = load_gate(tmp_path / "plain.safetensors")
    state = {k: v for k, v in reranker.state_dict().items() if not k.startswith("memory.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    # add-memory on the existing plain re-ranker, memory from the tuning split (out-of-fold weight)
    assert cli.main(["add-memory", "--gate", str(tmp_path / "plain.safetensors"), "--tune", str(caches / "tune"),
                     "--memory-source", "tune", "--retrieval", "2", "--memory-size", "0", "--retrieval-keys", "cand",
                     "--out", str(tmp_path / "added")]) == 0
    added = json.loads((tmp_path / "added.json").read_text())
    tune_pairs = len(load_gate_data([caches / "tune"]))
    assert added["retrieval"]["size"] == tune_pairs * 10 and added["retrieval"]["source"] == "tune"
    assert added["retrieval"]["keys"] == "cand" and added["training"]["hidden_dim"] == 32
    assert added["memory_building"]["retrieval"] == 2
    capsys.readouterr()
    # the explanation: the pipeline reports each candidate's retrieved estimate, by rank, as decide gives it
    results, decision = pipeline_and_cache_decisions(tiny_model_dir, tmp_path / "ret.safetensors", caches, 3)
    assert [r.switched for r in results] == decision.switched.tolist()
    for b, r in enumerate(results):
        assert np.allclose(r.retrieved_scores, decision.retrieved[b, r.slots].numpy(), atol=1e-4)
        assert r.to_json()["retrieved_scores"] == r.retrieved_scores
    no_memory = Pipeline(deris=tiny_model_dir / "deris", gate=tmp_path / "plain.safetensors", device="cpu")
    sample = RefShapes("val", num_images=1, seed=3, image_size=(128, 128))[0]
    assert no_memory(sample.image, sample.text).to_json()["retrieved_scores"] is None
    # errors a user can fix, in one line
    assert cli.main(["add-memory", "--gate", str(tmp_path / "plain.safetensors"), "--tune", str(caches / "tune"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "needs the training caches" in capsys.readouterr().err
    assert cli.main(["evaluate", "--cache", str(caches / "val"), "--gate", str(tmp_path / "plain.safetensors"),
                     str(tmp_path / "ret.safetensors"), "--out", str(tmp_path / "report")]) == 0
    assert "| ret |" in (tmp_path / "report" / "ablation.md").read_text()
