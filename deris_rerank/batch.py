"""Batch processing of many image-text pairs into an output folder, resumable and crash-safe.

Input: a JSONL or CSV manifest with `image`, `text` and optional `id` (image paths relative to
the manifest), or a folder of images with one expression for all or a texts file.
Output folder:
    masks/<id>.png   the selected mask (0/255)
    results.jsonl    one line per finished pair
    errors.jsonl     one line per failed pair, with the reason
    summary.json     counts and speed
A rerun into the same folder skips the ids already in results.jsonl. Every file is written
through a temp file + rename, and each results line with a single append, so a kill never
leaves a half-written mask or line (a torn last line is ignored when resuming). When a run
completes, results.jsonl and errors.jsonl are rewritten in manifest order, so an interrupted
and resumed run ends with the same files as an uninterrupted one (timings aside).
"""
from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List

from tqdm import tqdm

from .errors import DerisRerankError, InputError, OutputError
from .fileio import atomic_write
from .pipeline import Pipeline
from .rle import encode_mask
from .visualize import save_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 120


@dataclass(frozen=True)
class BatchItem:
    """One pair to process: `id` names its outputs (already sanitised and unique)."""

    id: str
    image: Path
    text: str


def sanitize_id(raw: str) -> str:
    """A file-name-safe id: letters, digits, `.`, `_`, `-` only, no leading dot, at most 120 chars."""
    cleaned = _UNSAFE.sub("_", str(raw)).lstrip(".")[:MAX_ID_LENGTH]
    return cleaned or "item"


def _unique_ids(raw_ids: Iterable[str]) -> List[str]:
    """Sanitise ids and make them unique in order (`x`, `x-2`, `x-3`, ...)."""
    used, ids = set(), []
    for raw in raw_ids:
        base = candidate = sanitize_id(raw)
        n = 1
        while candidate in used:
            n += 1
            candidate = f"{base}-{n}"
        used.add(candidate)
        ids.append(candidate)
    return ids


def read_manifest(path: Path) -> List[BatchItem]:
    """Pairs from a JSONL (one object per line) or CSV (header row) manifest."""
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not a JSON object ({exc.msg}); expected one object per line") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "image" not in row or "text" not in row:
            raise InputError(f"{path}: row {number} needs 'image' and 'text' fields")
    ids = _unique_ids(row.get("id") or f"{Path(str(row['image'])).stem}_{i}" for i, row in enumerate(rows))
    return [BatchItem(i, (path.parent / str(row["image"])).resolve(), str(row["text"])) for i, row in zip(ids, rows)]


def read_folder(folder: Path, texts: List[str]) -> List[BatchItem]:
    """Every image file in `folder` (sorted) with every text in `texts`."""
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    if not texts:
        raise InputError("a folder of images needs --text or --texts-file")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    raw = [image.stem if len(texts) == 1 else f"{image.stem}_{k}" for image in images for k in range(len(texts))]
    pairs = [(image, text) for image in images for text in texts]
    return [BatchItem(i, image, text) for i, (image, text) in zip(_unique_ids(raw), pairs)]


def _read_jsonl(path: Path) -> List[dict]:
    """Complete JSON lines of a file; a torn last line (from a kill) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite_jsonl(path: Path, records: List[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_batch(pipe: Pipeline, items: List[BatchItem], out_dir: Path, batch_size: int = 8, progress: bool = True) -> dict:
    """Process `items` into `out_dir` (see the module docstring). Returns the summary dict."""
    masks_dir = out_dir / "masks"
    try:
        masks_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}; choose a writable folder") from None
    results_path, errors_path = out_dir / "results.jsonl", out_dir / "errors.jsonl"
    order = {item.id: n for n, item in enumerate(items)}
    done = {r["id"]: r for r in _read_jsonl(results_path) if r.get("id") in order}
    _rewrite_jsonl(results_path, sorted(done.values(), key=lambda r: order[r["id"]]))  # drop a torn line
    _rewrite_jsonl(errors_path, [])
    todo = [item for item in items if item.id not in done]
    errors: Dict[str, dict] = {}
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for index, outcome in pipe.iter_batch([(item.image, item.text) for item in todo], batch_size=batch_size):
            item = todo[index]
            if isinstance(outcome, DerisRerankError):
                errors[item.id] = {"id": item.id, "image": str(item.image), "text": item.text, "error": str(outcome)}
                _append_line(errors_path, errors[item.id])
            else:
                mask_path = masks_dir / f"{item.id}.png"
                if masks_dir.resolve() not in mask_path.resolve().parents:
                    raise OutputError(f"id {item.id!r} would write outside {masks_dir}")
                save_png(mask_path, outcome.mask)
                record = {
                    "id": item.id,
                    "image": str(item.image),
                    "text": item.text,
                    "selected": outcome.selected,
                    "selected_slot": outcome.selected_slot,
                    "switched": outcome.switched,
                    "p_fail": outcome.p_fail,
                    "scores": outcome.scores,
                    "mask": encode_mask(outcome.mask),
                    "timings_ms": outcome.timings,
                }
                done[item.id] = record
                _append_line(results_path, record)
            bar.update(1)
    elapsed = time.perf_counter() - start
    _rewrite_jsonl(results_path, sorted(done.values(), key=lambda r: order[r["id"]]))
    _rewrite_jsonl(errors_path, sorted(errors.values(), key=lambda r: order[r["id"]]))
    processed = len(todo) - len(errors)
    summary = {
        "total": len(items),
        "succeeded": len(done),
        "failed": len(errors),
        "skipped_already_done": len(items) - len(todo),
        "switched": sum(1 for r in done.values() if r["switched"]),
        "processed_this_run": processed,
        "seconds_this_run": round(elapsed, 3),
        "pairs_per_second": round(processed / elapsed, 3) if elapsed > 0 and processed else None,
        "gate": pipe.gate is not None,
        "model": pipe.config.name,
    }
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    return summary

