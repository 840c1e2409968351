"""hf://OWNER/REPO[@REVISION]/PATH model paths, offline: a Hugging Face cache laid out as
huggingface_hub lays it out (models--OWNER--REPO/{refs, snapshots/<commit>/PATH, blobs}) is built
in tmp_path from the embedded default's files, and HF_HUB_OFFLINE is on, so nothing touches the
network. The errors a user can meet online are checked with stand-ins for huggingface_hub's
exception classes (they are matched by name)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from deris_rerank import cli
from deris_rerank.errors import CheckpointError, EmbeddedDefaultWarning
from deris_rerank.hub import hub_local_path, parse_hub_path
from deris_rerank.model_files import DEFAULT_MODEL, resolve_deris, resolve_gate

hf = pytest.importorskip("huggingface_hub")
hf_settings = pytest.importorskip("huggingface_hub.constants")

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "demo" / "assets" / "shapes.png"
TEXT = "the biggest cross"
MAIN = "a" * 40  # the commit refs/main points at
TAGGED = "b" * 40  # the commit of tag v1
FILES = ("model.safetensors", "config.json", "tokenizer.model", "gate.safetensors", "gate.json")
ROOT = "hf://acme/refshapes"


def add_file(repo: Path, commit: str, name: str, data: bytes) -> None:
    """One file of `commit` as huggingface_hub stores it: a blob named by its hash, linked from the snapshot."""
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """The cache folder, holding acme/refshapes: main = deris-tiny/ (the embedded default's five
    files) and lonely.safetensors (a gate without its .json); tag v1 = deris-tiny/ only."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--refshapes"
    for commit in (MAIN, TAGGED):
        for name in FILES:
            add_file(repo, commit, f"deris-tiny/{name}", (DEFAULT_MODEL / name).read_bytes())
    add_file(repo, MAIN, "lonely.safetensors", (DEFAULT_MODEL / "gate.safetensors").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)  # no newline, as huggingface_hub writes it
    (repo / "refs" / "v1").write_text(TAGGED)
    # huggingface_hub reads its environment once, at import (already done in this process), so
    # its constants are set too; a fresh process (the CLI test) sees only the environment.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_settings, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_settings, "HF_HUB_OFFLINE", True)
    return cache


def segment(**files):
    from deris_rerank import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedDefaultWarning)
        pipe = Pipeline(device="cpu", **files)
    return pipe, pipe(str(IMAGE), TEXT)


def test_pipeline_from_hf_paths_gives_the_default_pipelines_result(hub_cache):
    pipe, result = segment(deris=f"{ROOT}/deris-tiny", tokenizer=f"{ROOT}/deris-tiny/tokenizer.model",
                           gate=f"{ROOT}/deris-tiny/gate.safetensors")
    _, default = segment()
    snapshot = hub_cache / "models--acme--refshapes" / "snapshots" / MAIN
    assert pipe.deris_path == snapshot / "deris-tiny" and pipe.gate_path == snapshot / "deris-tiny" / "gate.safetensors"
    assert not pipe.is_embedded_default
    assert np.array_equal(result.mask, default.mask) and result.mask.any()
    assert (result.selected_rank, result.switched) == (default.selected_rank, default.switched)
    assert result.p_fail == default.p_fail and np.array_equal(result.scores, default.scores)


def test_a_deris_file_brings_its_config_tokenizer_and_gate_from_its_commit(hub_cache, monkeypatch):
    asked = []
    real = hf.hf_hub_download

    def recording(**kwargs):
        asked.append((kwargs["filename"], kwargs["revision"]))
        return real(**kwargs)

    monkeypatch.setattr(hf, "hf_hub_download", recording)
    path = resolve_deris(f"{ROOT}/deris-tiny/model.safetensors")
    assert path == hub_cache / "models--acme--refshapes" / "snapshots" / MAIN / "deris-tiny" / "model.safetensors"
    assert asked[0] == ("deris-tiny/model.safetensors", None)
    beside = {name: revision for name, revision in asked[1:]}
    assert beside.keys() >= {f"deris-tiny/{name}" for name in FILES[1:]} and set(beside.values()) == {MAIN}


def test_load_deris_and_load_gate_take_hf_paths(hub_cache):
    import torch

    from deris_rerank import load_deris, load_gate

    from_hub = load_deris(f"{ROOT}/deris-tiny/model.safetensors").state_dict()
    local = load_deris(DEFAULT_MODEL).state_dict()
    assert from_hub.keys() == local.keys() and all(torch.equal(from_hub[k], local[k]) for k in local)
    gate = load_gate(f"{ROOT}/deris-tiny/gate.json")  # either file of the pair names it
    assert gate.rule == load_gate(DEFAULT_MODEL / "gate.safetensors").rule


def test_convert_reads_an_hf_file(hub_cache, tmp_path, capsys):
    assert cli.main(["convert", f"{ROOT}/deris-tiny/model.safetensors", str(tmp_path / "out")]) == 0
    assert "preset deris-tiny" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()


def test_a_revision_picks_its_commit(hub_cache):
    snapshots = hub_cache / "models--acme--refshapes" / "snapshots"
    assert resolve_gate(f"{ROOT}@v1/deris-tiny/gate.safetensors", None) == snapshots / TAGGED / "deris-tiny" / "gate.safetensors"
    assert resolve_deris(f"{ROOT}@{MAIN}/deris-tiny") == snapshots / MAIN / "deris-tiny"
    assert parse_hub_path(f"{ROOT}@refs/pr/3/deris-tiny").revision == "refs/pr/3"
    assert parse_hub_path(f"{ROOT}@feature%2Fx/a.pth").revision == "feature/x"
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve_deris(f"{ROOT}@v2/deris-tiny")  # never fetched


def one_line_error(call, *needles):
    with pytest.raises(CheckpointError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


def test_missing_files_and_repositories_offline_are_one_line_errors_naming_the_path(hub_cache):
    for text in (f"{ROOT}/deris-tiny/nope.pth", f"{ROOT}/no-such-folder", "hf://acme/absent/model.pth"):
        one_line_error(lambda: resolve_deris(text), text, "HF_HUB_OFFLINE", str(hub_cache))
    one_line_error(lambda: resolve_gate(f"{ROOT}/lonely.safetensors", None),
                   f"{ROOT}/lonely.safetensors needs {ROOT}/lonely.json beside it", "HF_HUB_OFFLINE")


def test_malformed_hf_paths_say_what_form_is_wanted():
    for text in ("hf://acme/refshapes", "hf://acme/refshapes/", "hf://acme", "hf://acme/refshapes@v1", "hf://"):
        one_line_error(lambda: parse_hub_path(text), "malformed", "hf://OWNER/REPO/PATH")
    one_line_error(lambda: parse_hub_path("hf://acme/refshapes/a/../b.pth"), "'..'")
    one_line_error(lambda: parse_hub_path("hf://datasets/acme/refshapes/x.pth"), "only model repositories")


def test_without_huggingface_hub_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    one_line_error(lambda: resolve_deris(f"{ROOT}/deris-tiny"), f"{ROOT}/deris-tiny", 'pip install -e ".[hub]"')


def failing(name, base=Exception):
    """A stand-in for one of huggingface_hub's exception classes (matched by name)."""
    def fail(**kwargs):
        raise type(name, (base,), {})("404 Client Error\nmore lines the user does not need")
    return fail


@pytest.mark.parametrize("error, needle", [
    ("RepositoryNotFoundError", "no model repository acme/refshapes"),
    ("GatedRepoError", "acme/refshapes is gated"),
    ("RevisionNotFoundError", "has no revision"),
    ("HFValidationError", "not a valid repository name"),
    ("HfHubHTTPError", "failed: 404 Client Error"),
])
def test_hub_errors_online_become_one_line_errors(monkeypatch, error, needle):
    monkeypatch.setattr(hf, "hf_hub_download", failing(error, OSError if error == "HfHubHTTPError" else Exception))
    one_line_error(lambda: hub_local_path(f"{ROOT}@v9/model.pth"), f"{ROOT}@v9/model.pth", needle)


def test_a_path_that_is_neither_file_nor_folder_online(monkeypatch, tmp_path):
    entry = type("EntryNotFoundError", (Exception,), {})
    remote = type("RemoteEntryNotFoundError", (entry,), {})
    monkeypatch.setattr(hf, "hf_hub_download", lambda **kwargs: (_ for _ in ()).throw(remote("404")))
    monkeypatch.setattr(hf, "snapshot_download", lambda **kwargs: str(tmp_path))  # the folder is not there
    one_line_error(lambda: hub_local_path(f"{ROOT}/weights/x.pth"), "acme/refshapes has no file or folder weights/x.pth")


def test_cli_takes_hf_paths_and_reports_a_missing_one_in_one_line(hub_cache, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "deris_rerank", "segment", "--deris", f"{ROOT}/deris-tiny", "--image", str(IMAGE),
                          "--text", TEXT, "--out", str(tmp_path), "--json", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    _, default = segment()
    assert json.loads(run.stdout)["selected"] == default.selected_rank and (tmp_path / "shapes_mask.png").is_file()
    missing = f"{ROOT}/deris-tiny/missing.safetensors"
    assert cli.main(["segment", "--deris", missing, "--image", str(IMAGE), "--text", TEXT, "--device", "cpu"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("deris-rerank: error: " + missing) and "HF_HUB_OFFLINE" in errors[0]


def test_huggingface_hub_is_imported_only_for_an_hf_path():
    code = ("import sys; import deris_rerank, deris_rerank.cli; deris_rerank.cli.build_parser(); "
            "from deris_rerank.model_files import DEFAULT_MODEL, resolve_deris, resolve_gate, resolve_tokenizer; "
            "path = resolve_deris(str(DEFAULT_MODEL)); resolve_tokenizer(None, path); resolve_gate(None, path); "
            "print('huggingface_hub' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_the_ray_spec_leaves_hf_paths_to_each_replica():
    from deris_rerank.distributed import PipelineSpec

    spec = PipelineSpec(deris=f"{ROOT}/deris-tiny", gate=f"{ROOT}/deris-tiny/gate.safetensors").resolved()
    assert (spec.deris, spec.gate) == (f"{ROOT}/deris-tiny", f"{ROOT}/deris-tiny/gate.safetensors")
