"""The Ray engine (`--engine ray`) gives the local engine's outputs: batch results, masks and errors
byte for byte, a killed driver resumes to the same files, extract's shards hold equal tensors; and
without Ray, `--engine ray` fails with one line saying how to install it.

One local Ray (2 CPUs) serves the whole module; the model is the embedded default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from deris_rerank.batch import read_manifest, run_batch
from deris_rerank.data import RefShapes
from deris_rerank.model_files import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]
NEEDS_DEFAULT = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(),
                                   reason=f"embedded default model not found in {DEFAULT_MODEL}")
RAY_PLACEMENT = dict(replicas=2, cpus_per_replica=0.5)  # two replicas and room for decoding on 2 CPUs
BATCH_SIZE = 4  # several chunks per image group size, so the batches' composition matters


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module (its start-up costs seconds): the address drivers connect to."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[ray]\")")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # workers import this checkout's deris_rerank
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """38 pairs: 12 RefShapes images with 2-4 texts each, a corrupt image, a missing file and an empty text."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for sample in RefShapes("test", num_images=10, seed=3, image_size=(128, 128)):
        name = f"{sample.image_id}.png"
        if not (root / name).exists():
            Image.fromarray(sample.load_image()).save(root / name)
        rows.append({"image": name, "text": sample.text, "id": sample.id})
    (root / "corrupt.png").write_bytes(b"not a png")
    rows += [{"image": "corrupt.png", "text": "the red circle"}, {"image": "missing.png", "text": "the blue square"},
             {"image": rows[0]["image"], "text": "   ", "id": "empty_text"}]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert 30 <= len(rows) <= 45
    return path


@pytest.fixture(scope="module")
def local_run(manifest, tmp_path_factory) -> Path:
    """The local engine's output folder for the manifest (one torch thread, as each Ray replica here)."""
    from deris_rerank.pipeline import Pipeline

    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip(f"embedded default model not found in {DEFAULT_MODEL}")
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the embedded default announces itself
            pipe = Pipeline()
        run_batch(pipe, read_manifest(manifest), out, batch_size=BATCH_SIZE, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _content(out: Path) -> dict:
    """What must be equal between engines: results lines without timings, sorted by id; error
    lines; every mask's bytes; the summary's counts."""
    def lines(name):
        return sorted((json.loads(line) for line in (out / name).read_text().splitlines()), key=lambda r: r["id"])
    results = lines("results.jsonl")
    for record in results:
        record.pop("timings_ms")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "results": results,
        "errors": lines("errors.jsonl"),
        "masks": {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())},
        "counts": {k: summary[k] for k in ("total", "succeeded", "failed", "switched", "empty_masks")},
        "run": json.loads((out / "run.json").read_text())["model"],
    }


@NEEDS_DEFAULT
def test_ray_batch_equals_local(ray_address, manifest, local_run, tmp_path):
    from deris_rerank.distributed import PipelineSpec, Resources, run_batch as run_batch_ray

    summary = run_batch_ray(read_manifest(manifest), tmp_path, PipelineSpec(), Resources(**RAY_PLACEMENT),
                            batch_size=BATCH_SIZE, progress=False)
    assert summary["engine"] == {"name": "ray", "replicas": 2}
    expected, got = _content(local_run), _content(tmp_path)
    assert got["counts"] == expected["counts"] and expected["counts"]["failed"] == 3
    assert got["errors"] == expected["errors"]
    assert got["results"] == expected["results"]
    assert got["masks"] == expected["masks"]
    assert got["run"] == expected["run"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


KILLER = """
import os, signal, sys
from deris_rerank import batch
from deris_rerank.cli import main

write, written = batch.BatchOutput.write, []
def write_then_die(self, item, record, mask):
    write(self, item, record, mask)
    written.append(item.id)
    if len(written) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
batch.BatchOutput.write = write_then_die
sys.exit(main(sys.argv[2:]))
"""


@NEEDS_DEFAULT
def test_killed_driver_resumes_to_the_uninterrupted_files(ray_address, manifest, local_run, tmp_path):
    from deris_rerank.distributed import PipelineSpec, Resources, run_batch as run_batch_ray

    out = tmp_path / "out"
    command = [sys.executable, "-c", KILLER, "6", "batch", "--manifest", str(manifest), "--out", str(out), "--quiet",
               "--batch-size", str(BATCH_SIZE), "--engine", "ray", "--address", ray_address, "--replicas", "2",
               "--cpus-per-replica", "0.5"]
    killed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after its 6th written result
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert not (out / "summary.json").exists()

    summary = run_batch_ray(read_manifest(manifest), out, PipelineSpec(), Resources(**RAY_PLACEMENT),
                            batch_size=BATCH_SIZE, progress=False)
    assert summary["skipped_already_done"] == 6
    assert summary["processed_this_run"] == summary["total"] - 6 - summary["failed"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(line)["id"] for line in lines}) == summary["succeeded"]  # no duplicates
    assert _content(out) == _content(local_run)


@NEEDS_DEFAULT
def test_ray_extract_equals_local(ray_address, tmp_path):
    from safetensors import safe_open

    from deris_rerank.distributed import PipelineSpec, Resources, run_extract
    from deris_rerank.pipeline import Pipeline
    from deris_rerank.workflow.extract import extract_split

    samples = list(RefShapes("val", num_images=6, seed=5, image_size=(128, 128)))
    for k in (9, 3, 2):  # error records, in two shards
        samples[k] = dataclasses.replace(samples[k], text=" ")
    settings = dict(shard_size=7, batch_size=BATCH_SIZE, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            local = extract_split(Pipeline(gate=False), samples, tmp_path / "local", **settings)
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distributed = run_extract(samples, tmp_path / "ray", PipelineSpec(gate=False), Resources(**RAY_PLACEMENT),
                                  **settings)
    assert distributed == local and local["failed"] == 3
    shards = sorted(p.name for p in (tmp_path / "local" / "val").glob("shard_*"))
    assert len(shards) >= 2 and shards == sorted(p.name for p in (tmp_path / "ray" / "val").glob("shard_*"))
    for name in shards:
        with safe_open(str(tmp_path / "local" / "val" / name), "pt") as a, \
                safe_open(str(tmp_path / "ray" / "val" / name), "pt") as b:
            assert a.metadata() == b.metadata()
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)
    assert (tmp_path / "ray" / "val" / "errors.jsonl").read_text() == (tmp_path / "local" / "val" / "errors.jsonl").read_text()
    again = run_extract(samples, tmp_path / "ray", PipelineSpec(gate=False), Resources(**RAY_PLACEMENT), **settings)
    assert again == {"written": 0, "skipped": len(samples), "failed": 0}  # complete shards are skipped


def test_placement_that_does_not_fit_is_one_line(ray_address, tmp_path):
    from deris_rerank.distributed import Resources, connect, placement
    from deris_rerank.errors import InputError

    ray = connect()
    with pytest.raises(InputError, match="lower --replicas"):
        placement(ray, Resources(replicas=3))  # 3 x 1 CPU on a 2-CPU Ray
    with pytest.raises(InputError, match="GPUs"):
        placement(ray, Resources(replicas=1, gpus_per_replica=1))
    assert placement(ray, Resources(**RAY_PLACEMENT)) == (2, 0.0, 0.5)


def test_without_ray_the_ray_engine_is_one_line(manifest, tmp_path):
    """`import ray` made to fail: exit 2, one line on stderr naming the install command; nothing written."""
    code = ("import sys; sys.modules['ray'] = None; from deris_rerank.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for command in (["batch", "--manifest", str(manifest), "--out", str(tmp_path / "out")],
                    ["extract", "--data", "refshapes", "--split", "val", "--refshapes-images", "2",
                     "--out", str(tmp_path / "cache")]):
        done = subprocess.run([sys.executable, "-c", code, *command, "--engine", "ray"], env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            'deris-rerank: error: the Ray engine needs Ray Data: pip install -e ".[ray]" in the deris-rerank checkout '
            '(or pip install "ray[data]>=2.60")']
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_only_the_ray_engine_imports_ray():
    code = ("import sys; import deris_rerank.cli, deris_rerank.batch, deris_rerank.pipeline, "
            "deris_rerank.workflow.extract, deris_rerank.distributed; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_unreachable_address_is_one_line_not_minutes_of_retries():
    import socket

    pytest.importorskip("ray")
    from deris_rerank.distributed import _check_reachable
    from deris_rerank.errors import DerisRerankError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DerisRerankError, match="cannot reach a Ray cluster at 127.0.0.1"):
        _check_reachable(f"127.0.0.1:{port}")
    _check_reachable("auto")  # left to Ray


@NEEDS_DEFAULT
def test_extract_command_with_engine_ray(ray_address, tmp_path, capsys):
    """The command line's path: `extract --engine ray` writes the shards the local command writes."""
    from safetensors import safe_open

    from deris_rerank.cli import main

    common = ["extract", "--data", "refshapes", "--split", "val", "--refshapes-images", "3", "--refshapes-size", "128",
              "--shard-size", "5", "--batch-size", str(BATCH_SIZE), "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(common + ["--out", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(common + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--address", ray_address,
                          "--replicas", "2", "--cpus-per-replica", "0.5"]) == 0
    local_line, ray_line = capsys.readouterr().out.strip().splitlines()
    assert local_line == ray_line
    shards = sorted(p.name for p in (tmp_path / "local" / "val").glob("shard_*"))
    assert shards == sorted(p.name for p in (tmp_path / "ray" / "val").glob("shard_*"))
    for name in shards:
        with safe_open(str(tmp_path / "local" / "val" / name), "pt") as a, \
                safe_open(str(tmp_path / "ray" / "val" / name), "pt") as b:
            assert a.metadata() == b.metadata()
            assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


class _FakeCluster:
    """Stands in for the `ray` module where only cluster_resources() is read."""

    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_placement_defaults_one_replica_per_gpu():
    from deris_rerank.distributed import Resources, placement
    from deris_rerank.errors import InputError

    gpus = _FakeCluster(CPU=16.0, GPU=8.0)
    assert placement(gpus, Resources()) == (8, 1.0, 1.0)
    assert placement(gpus, Resources(gpus_per_replica=2)) == (4, 2.0, 1.0)
    assert placement(gpus, Resources(), device="cpu") == (1, 0.0, 1.0)  # --device cpu takes no GPU
    assert placement(_FakeCluster(CPU=4.0), Resources()) == (1, 0.0, 1.0)
    with pytest.raises(InputError, match="9 replica"):
        placement(gpus, Resources(replicas=9))
