"""The Ray Data engine for `batch` and `extract`: the same outputs as the local engine, on many GPUs and machines.

Shape of a job:

    driver:  pairs -> model runs ("chunks": image groups of at most batch_size pairs, exactly as
             the local engine forms them, `pipeline.plan_chunks`) -> one Ray Data row per chunk
    tasks:   decode + preprocess the chunk's images on CPU workers (`pipeline.decode_image`)
    actors:  `replicas` model actors, each holding one `Pipeline` (built once, on its GPU when
             given), run each chunk as one model run (batch: Results; extract: cache fields)
    driver:  receives the outcomes as they stream back and writes them with the local engine's
             writers (`batch.BatchOutput`, `workflow.extract.save_shard`): atomic files, one
             appended line per pair, the same resume rule and settings check.

Because every chunk is one model run of the same pairs as in the local engine, results are
byte-identical to `--engine local` (float32 sums depend on the batch's composition, so the
batches must be the same; and on the torch thread count: a replica runs with as many threads
as its whole CPUs, at least 1 (`replica_threads`), so compare with a local run at that many
threads, `--threads N`). Both are part of the run's identity (`run_identity.engine_identity`).
A resumed batch run plans its chunks over the whole list, skips chunks already finished and runs
a partly finished chunk whole (writing only its missing pairs), so a killed and resumed run
forms the same batches as an uninterrupted one.

Ray is an optional dependency (`pip install -e ".[ray]"`); this is the only module that imports
it, and only when a function here runs. Model files and images must be readable under the same
paths on every node (a shared filesystem, or the same files copied to each node).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from .batch import BatchItem, BatchOutput, result_record
from .errors import DerisRerankError, EmbeddedDefaultWarning, InputError, install_hint
from .run_identity import engine_identity

INSTALL_HINT = "the Ray engine needs Ray Data: " + install_hint("ray", '"ray[data]>=2.60"')
DECODE_CPUS = 0.25  # logical CPUs reserved by each decode task (light next to a model replica)
MAX_BLOCKS = 1000  # Ray Data blocks the chunk rows are split into (at most)


def require_ray():
    """The `ray` module with Ray Data, or a DerisRerankError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DerisRerankError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class PipelineSpec:
    """How each replica builds its `Pipeline`: the keyword arguments of `Pipeline(...)`, as paths
    and plain values (built objects cannot be shipped). Paths that exist here are made absolute,
    so workers started elsewhere find them; every node must see them under the same path."""

    deris: Optional[str] = None
    tokenizer: Optional[str] = None
    gate: Any = None  # None (look beside the weights), False (no gate) or a path
    device: str = "auto"
    dtype: Optional[str] = None
    tau: Optional[float] = None
    operating_point: Optional[str] = None
    answer: Optional[str] = None
    batch_semantics: str = "per_sample"
    query_source: str = "perception"
    runtime: str = "torch"

    def resolved(self) -> "PipelineSpec":
        """This spec with every existing path made absolute (preset names are left as they are)."""
        def absolute(value):
            return str(Path(value).resolve()) if isinstance(value, (str, os.PathLike)) and Path(value).exists() else value
        return dataclasses.replace(self, deris=absolute(self.deris), tokenizer=absolute(self.tokenizer),
                                   gate=absolute(self.gate))

    def build(self):
        """The Pipeline (on this process's device: the replica's GPU when it has one)."""
        from .pipeline import Pipeline

        return Pipeline(**dataclasses.asdict(self))


@dataclass(frozen=True)
class Resources:
    """Where the job runs: Ray's address (None: $RAY_ADDRESS, else a local Ray started for the run),
    model replicas and each replica's GPUs / CPUs (None: 1 GPU when the cluster has GPUs, else 0;
    1 CPU). replicas None: one per GPU when the cluster has GPUs, else 1."""

    address: Optional[str] = None
    replicas: Optional[int] = None
    gpus_per_replica: Optional[float] = None
    cpus_per_replica: Optional[float] = None


def connect(address: Optional[str] = None):
    """Connect to Ray (or reuse this process's connection); returns the `ray` module.

    address: a cluster address ("ray://host:10001", "host:6379", "auto"); None: $RAY_ADDRESS,
    else a local Ray is started for this process.
    """
    ray = require_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DerisRerankError(f"cannot connect to Ray at {address or 'a new local Ray'}: {reason}; start a cluster "
                                   f"with `ray start --head` or pass --address of a running one") from None
    # Our own progress bar counts pairs; Ray Data's would print beside it (and say that it is off).
    ray.data.DataContext.get_current().enable_progress_bars = False
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    return ray


def _check_reachable(address: Optional[str], timeout_s: float = 10.0) -> None:
    """DerisRerankError when a "host:port" or "ray://host:port" address takes no TCP connection
    (Ray itself would retry for minutes); other forms ("auto", None) are left to Ray."""
    import socket

    if not address or address == "auto" or ":" not in address:
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not port.isdigit():
        raise InputError(f"--address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise DerisRerankError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                               f"`ray start --head` or check --address / $RAY_ADDRESS") from None


def placement(ray, resources: Resources, device: str = "auto") -> Tuple[int, float, float]:
    """(replicas, GPUs per replica, CPUs per replica), defaults filled from the cluster (no GPU by
    default when `device` is the CPU); InputError when they do not fit in it (Ray would otherwise
    wait for ever for the missing resources)."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    default_gpus = 1.0 if gpus > 0 and not str(device).startswith("cpu") else 0.0
    gpus_each = resources.gpus_per_replica if resources.gpus_per_replica is not None else default_gpus
    cpus_each = resources.cpus_per_replica if resources.cpus_per_replica is not None else 1.0
    replicas = resources.replicas or (max(1, int(gpus // gpus_each)) if gpus_each > 0 else 1)
    if replicas < 1 or gpus_each < 0 or cpus_each <= 0:
        raise InputError(f"--replicas must be at least 1 and --cpus-per-replica above 0 (got {replicas}, {cpus_each})")
    if replicas * gpus_each > gpus:
        raise InputError(f"{replicas} replica(s) x {gpus_each:g} GPU need {replicas * gpus_each:g} GPUs, the Ray cluster "
                         f"has {gpus:g}; lower --replicas or --gpus-per-replica")
    if replicas * cpus_each + DECODE_CPUS > cpus:
        raise InputError(f"{replicas} replica(s) x {cpus_each:g} CPU leave no CPU for decoding images on a Ray cluster "
                         f"of {cpus:g} CPUs; lower --replicas or --cpus-per-replica (e.g. {max(0.25, (cpus - 0.5) / replicas):g})")
    return replicas, gpus_each, cpus_each


def replica_threads(cpus_per_replica: float) -> int:
    """torch's CPU threads in a replica with `cpus_per_replica` CPUs: its whole CPUs, at least 1."""
    return max(1, int(cpus_per_replica))


# ----------------------------------------------------------------------------------- workers
def _probe(spec: PipelineSpec, protocol: Optional[str], source: Optional[dict]) -> dict:
    """Runs as a Ray task with a replica's resources: build the pipeline once and report what the
    driver needs before any work (identity, provenance, input sizes) and the warnings it raised."""
    from .run_identity import pipeline_identity
    from .workflow.extract import extract_provenance

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = spec.build()
    return {
        "identity": pipeline_identity(pipe),
        "provenance": None if protocol is None else extract_provenance(pipe, protocol, source),
        "sizes": (pipe.config.image_size, pipe.config.image_size_lo),
        "warnings": [(w.category, str(w.message)) for w in caught],
    }


def _decode_row(row: Dict[str, Any], sizes: Tuple[int, int]) -> Dict[str, Any]:
    """Ray Data task: decode and preprocess the images of one chunk (and, for extract, compute the
    ground-truth masks). A group whose image cannot be read carries the reason instead."""
    from .pipeline import decode_image

    chunk = pickle.loads(row["payload"])
    for group in chunk["groups"]:
        try:
            group["image"] = decode_image(group["image"], *sizes)
        except DerisRerankError as exc:
            group["image"] = exc
            continue
        for member in group["members"]:
            if member.get("target") is not None:
                member["target"] = member["target"]()
    return {"chunk": row["chunk"], "payload": pickle.dumps(chunk)}


class _Replica:
    """Ray Data actor: one Pipeline, built once (on the replica's GPU when it has one, with
    `threads` torch threads); runs one chunk per call as one model run."""

    def __init__(self, spec: PipelineSpec, mode: str, batch_size: int, protocol: Optional[str], threads: int):
        import torch

        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmbeddedDefaultWarning)  # the driver says it once
            self.pipe = spec.build()
        self.mode, self.batch_size, self.protocol = mode, batch_size, protocol

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """One Ray Data batch of chunk rows {"chunk": int [R], "payload": bytes [R]} -> the same rows
        with the chunks' outcomes as payloads."""
        import numpy as np

        payloads = [pickle.dumps(self._run(pickle.loads(payload))) for payload in batch["payload"]]
        return {"chunk": np.asarray(batch["chunk"]), "payload": np.array(payloads, dtype=object)}

    def _run(self, chunk: dict) -> dict:
        """Outcomes [(ref, "ok", value) or (ref, "error", reason)] and the warnings raised."""
        pairs, members, outcomes = [], [], []
        for number, group in enumerate(chunk["groups"]):
            for member in group["members"]:
                if isinstance(group["image"], DerisRerankError):
                    outcomes.append((member["ref"], "error", str(group["image"])))
                else:
                    pairs.append((group["image"], member["text"], number))
                    members.append(member)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.mode == "batch":
                outcomes += self._segment(pairs, members)
            else:
                outcomes += self._features(pairs, members)
        return {"outcomes": outcomes, "warnings": [(w.category, str(w.message)) for w in caught]}

    def _segment(self, pairs, members) -> List[tuple]:
        """batch: each pair's results line and mask (bool [H, W])."""
        outcomes = []
        for index, outcome in self.pipe.iter_batch(pairs, batch_size=self.batch_size):
            member = members[index]
            if isinstance(outcome, DerisRerankError):
                outcomes.append((member["ref"], "error", str(outcome)))
            else:
                outcomes.append((member["ref"], "ok", (result_record(member["item"], outcome), outcome.mask)))
        return outcomes

    def _features(self, pairs, members) -> List[tuple]:
        """extract: each pair's cache fields (CPU tensors without the pair dimension)."""
        from .candidates import CandidateBatch
        from .workflow.extract import batch_fields

        outcomes = []
        for item in self.pipe.iter_candidates(pairs, batch_size=self.batch_size):
            if isinstance(item, CandidateBatch):
                truths = [members[i]["target"] for i in item.indices]
                for i, fields in batch_fields(item, truths, self.pipe.config, self.protocol).items():
                    outcomes.append((members[i]["ref"], "ok", {k: v.clone() for k, v in fields.items()}))
            else:
                i, error = item
                outcomes.append((members[i]["ref"], "error", str(error)))
        return outcomes


# ------------------------------------------------------------------------------------ driver
def _reemit(caught: Sequence[Tuple[type, str]]) -> None:
    for category, message in caught:
        warnings.warn(message, category, stacklevel=2)


def _stream(spec: PipelineSpec, resources: Resources, mode: str, batch_size: int, protocol: Optional[str],
            source: Optional[dict], plan, ordered: bool = False) -> Iterator[dict]:
    """Connect and probe; `plan(report, replicas, threads)` (threads: each replica's torch threads)
    checks the outputs against the probe's report before any work and returns the chunks to run;
    run them on the cluster and yield each chunk's outcomes as it arrives (ordered: in the chunks'
    order, a late chunk held back until the ones before it are done)."""
    ray = connect(resources.address)
    replicas, gpus_each, cpus_each = placement(ray, resources, spec.device)
    spec = spec.resolved()
    probe = ray.remote(num_cpus=cpus_each, num_gpus=gpus_each, max_retries=0)(_probe)
    try:
        report = ray.get(probe.remote(spec, protocol, source))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, DerisRerankError):  # a user's mistake (a missing model file, ...): its one line
            raise DerisRerankError(str(cause).strip().splitlines()[-1]) from None
        raise
    _reemit(report["warnings"])
    threads = replica_threads(cpus_each)
    chunks = plan(report, replicas, threads)
    if not chunks:
        return
    rows = [{"chunk": n, "payload": ray.cloudpickle.dumps(chunk)} for n, chunk in enumerate(chunks)]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    dataset = dataset.map(_decode_row, fn_kwargs={"sizes": report["sizes"]}, num_cpus=DECODE_CPUS)
    dataset = dataset.map_batches(
        _Replica, batch_size=1, batch_format="numpy", num_cpus=cpus_each, num_gpus=gpus_each,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        fn_constructor_args=(spec, mode, batch_size, protocol, threads),
    )
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, ordered
    try:
        for row in dataset.iter_rows():
            done = pickle.loads(row["payload"])
            _reemit(done["warnings"])
            yield done
    finally:
        options.preserve_order = before


def _groups(pairs: Sequence[tuple], chunk: List[List[int]], member) -> List[dict]:
    """One chunk as {"image": source, "members": [member(index), ...]} per image group."""
    return [{"image": pairs[group[0]][0], "members": [member(i) for i in group]} for group in chunk]


def run_batch(
    items: List[BatchItem], out_dir: Path, spec: PipelineSpec = PipelineSpec(), resources: Resources = Resources(),
    batch_size: int = 8, progress: bool = True, overwrite: bool = False,
) -> dict:
    """`batch.run_batch` on Ray: process `items` into `out_dir`, the same files and summary (plus
    "engine": {"name": "ray", "replicas": n}). Each replica builds its pipeline from `spec`;
    `resources` says where (see `Resources`).

    Raises OutputMismatchError before any pair is run (as the local engine does), and
    DerisRerankError when Ray is missing or unreachable or the resources do not fit the cluster.
    """
    from .pipeline import plan_chunks

    pairs = [(item.image, item.text) for item in items]
    state: Dict[str, Any] = {}

    def plan(report, replicas, threads):
        output = BatchOutput(out_dir, items, {**report["identity"], **engine_identity(batch_size, threads)},
                             overwrite=overwrite)
        state.update(output=output, replicas=replicas)
        return [  # every chunk with a pair still to do, whole: the same batches as an uninterrupted run
            {"groups": _groups(pairs, chunk, lambda i: {"ref": i, "text": items[i].text, "item": items[i]})}
            for chunk in plan_chunks(pairs, batch_size)
            if any(items[i].id not in output.done for group in chunk for i in group)
        ]

    start = time.perf_counter()
    bar = tqdm(unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for done in _stream(spec, resources, "batch", batch_size, None, None, plan):
            output = state["output"]
            bar.total = len(output.todo)
            for ref, kind, value in done["outcomes"]:
                item = items[ref]
                if item.id in output.done:  # finished earlier: one of a partly finished chunk's pairs
                    continue
                if kind == "error":
                    output.fail(item, value)
                else:
                    output.write(item, *value)
                bar.update(1)
    finally:
        bar.close()
    return state["output"].finish(time.perf_counter() - start,
                                  extra={"engine": {"name": "ray", "replicas": state["replicas"]}})


def run_extract(
    samples, out_dir: Path, spec: PipelineSpec = PipelineSpec(), resources: Resources = Resources(),
    shard_size: int = 10_000, batch_size: int = 8, protocol: str = "384", worker: Tuple[int, int] = (0, 1),
    progress: bool = True, source: Optional[dict] = None, overwrite: bool = False,
) -> Dict[str, int]:
    """`workflow.extract.extract_split` on Ray: the same shards (tensors equal) and errors, the same
    provenance check and resume rule (complete shards are skipped; `worker` as there). The driver
    writes the shards (and their errors) in split order, each as soon as all its pairs and those of
    the shards before it are back (Ray may return a later shard's failures first). Returns counts
    of pairs written, skipped and failed."""
    from .pipeline import plan_chunks
    from .workflow.extract import check_extract_inputs, ground_truth, plan_extract, save_shard

    check_extract_inputs(samples, protocol)
    state: Dict[str, Any] = {}

    def plan(report, replicas, threads):
        provenance = {**report["provenance"], **engine_identity(batch_size, threads)}
        jobs, counts = plan_extract(samples, out_dir, provenance, shard_size, worker, overwrite)
        state.update(jobs=jobs, counts=counts)
        chunks = []
        for j, job in enumerate(jobs):
            pairs = [(s.image, s.text, s.image_id or s.id) for s in job.samples]
            for chunk in plan_chunks(pairs, batch_size):
                chunks.append({"groups": _groups(pairs, chunk, lambda i, job=job, j=j: {
                    "ref": (j, i), "text": job.samples[i].text, "target": functools.partial(ground_truth, job.samples[i])})})
        return chunks

    collected: Dict[int, Dict[int, dict]] = {}
    failed: Dict[int, Dict[int, str]] = {}
    next_shard = 0  # jobs[:next_shard] are written
    bar = tqdm(unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for done in _stream(spec, resources, "extract", batch_size, protocol, source, plan, ordered=True):
            jobs, counts = state["jobs"], state["counts"]
            bar.total = sum(len(job.samples) for job in jobs)
            for (j, i), kind, value in done["outcomes"]:
                (failed if kind == "error" else collected).setdefault(j, {})[i] = value
                bar.update(1)
            while next_shard < len(jobs) and \
                    len(collected.get(next_shard, {})) + len(failed.get(next_shard, {})) == len(jobs[next_shard].samples):
                written, lost = save_shard(jobs[next_shard], collected.pop(next_shard, {}), failed.pop(next_shard, {}))
                counts["written"] += written
                counts["failed"] += lost
                next_shard += 1
    finally:
        bar.close()
    return state["counts"]
