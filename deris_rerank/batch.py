"""Batch processing of many image-text pairs into an output folder, resumable and crash-safe.

Input: a JSONL or CSV manifest with `image`, `text` and optional `id` (image paths relative to
the manifest), or a folder of images with one expression for all or a texts file (`read_texts`).
Both are read as UTF-8 (a byte-order mark is allowed). Either way, each pair's `image` is
recorded (results.jsonl, errors.jsonl) as its absolute path: made absolute from where it was
given (the manifest's folder, or the current folder for --images) and normalised, symbolic links
kept as they are.
Output folder:
    masks/<id>.png   the selected mask (0/255)
    results.jsonl    one line per finished pair
    errors.jsonl     one line per failed pair, with the reason
    summary.json     counts, speed and the run's identity
    run.json         the run's identity (model, tokenizer and gate hashes, decision rule, dtype, batch size,
                     torch threads, ...)
A rerun into the same folder skips the ids already in results.jsonl, but only when it has the
same identity and each finished id was made for the same image and text; otherwise it stops
with a message naming the differences (OutputMismatchError), and `overwrite=True` starts
afresh, removing the old outputs first. Every file is written
through a temp file + rename, and each results line with a single append, so a kill never
leaves a half-written mask or line (a torn last line is ignored when resuming). When a run
completes, results.jsonl and errors.jsonl are rewritten in manifest order, so an interrupted
and resumed run ends with the same files as an uninterrupted one (timings aside).
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tqdm import tqdm

from .errors import DerisRerankError, InputError, OutputError, OutputMismatchError
from .fileio import atomic_write
from .pipeline import Pipeline
from .tokenizer import shorten_text
from .rle import encode_mask
from .run_identity import engine_identity, identity_differences, pipeline_identity
from .visualize import save_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 120
IDENTITY_FILE = "run.json"


@dataclass(frozen=True)
class BatchItem:
    """One pair to process: `id` names its outputs (already sanitised and unique); `image` is the
    absolute path recorded for it (`absolute_image`)."""

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


def absolute_image(path: Path) -> Path:
    """The path a pair's image is recorded under: absolute and normalised (`..` removed), links not followed."""
    return Path(os.path.abspath(path))


def read_utf8(path: Path, what: str) -> str:
    """The text of the UTF-8 file `path` (a byte-order mark dropped); InputError naming `what`, the
    file and, for a byte that is not UTF-8, its line."""
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{what} {path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
                         "save the file as UTF-8") from None


def read_texts(path: Path) -> List[str]:
    """The expressions of a texts file: one per line, blank lines skipped."""
    return [line for line in read_utf8(path, "texts file").splitlines() if line.strip()]


def read_manifest(path: Path) -> List[BatchItem]:
    """Pairs from a JSONL (one object per line) or CSV (header row) manifest; `image` and `text`
    must be strings (InputError naming the row otherwise)."""
    rows = []
    text = read_utf8(path, "manifest")
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
        for field in ("image", "text"):
            if not isinstance(row[field], str):
                raise InputError(f"{path}: row {number}: '{field}' must be a string, got {json.dumps(row[field])}")
    ids = _unique_ids(row.get("id") or f"{Path(row['image']).stem}_{i}" for i, row in enumerate(rows))
    return [BatchItem(i, absolute_image(path.parent / row["image"]), row["text"]) for i, row in zip(ids, rows)]


def read_folder(folder: Path, texts: List[str]) -> List[BatchItem]:
    """Every image file in `folder` (sorted) with every text in `texts`.

    Ids: the image's stem for one text; with several texts, the stem, the text's words and a
    short hash of the text (`dog_the-brown-dog_1a2b3c`), so an id always names one image-text pair.
    """
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    if not texts:
        raise InputError("a folder of images needs --text or --texts-file")
    images = sorted(absolute_image(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    raw = [image.stem if len(texts) == 1 else f"{image.stem}_{_text_slug(text)}" for image in images for text in texts]
    pairs = [(image, text) for image in images for text in texts]
    return [BatchItem(i, image, text) for i, (image, text) in zip(_unique_ids(raw), pairs)]


def _text_slug(text: str) -> str:
    """A short file-name part for a text: its first words joined by '-', and 6 hex digits of its sha1."""
    words = "-".join(_UNSAFE.sub("", word) for word in text.lower().split())[:40].strip("-")
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()  # text that is not valid Unicode fails later
    return f"{words or 'text'}_{digest[:6]}"


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


def run_batch(
    pipe: Pipeline, items: List[BatchItem], out_dir: Path, batch_size: int = 8, progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Process `items` into `out_dir` (see the module docstring). Returns the summary dict.

    The run's identity includes batch_size and torch's thread count (`engine_identity`): a resumed
    run ends byte-identical to an uninterrupted one only with the same ones. Raises
    OutputMismatchError, before any work, when `out_dir` holds results of another run identity or
    for other inputs under the same ids (unless overwrite=True).
    """
    output = BatchOutput(out_dir, items, {**pipeline_identity(pipe), **engine_identity(batch_size)}, overwrite=overwrite)
    todo = output.todo
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for index, outcome in pipe.iter_batch([(item.image, item.text) for item in todo], batch_size=batch_size):
            item = todo[index]
            if isinstance(outcome, DerisRerankError):
                output.fail(item, str(outcome))
            else:
                output.write(item, result_record(item, outcome), outcome.mask)
            bar.update(1)
    return output.finish(time.perf_counter() - start)


class BatchOutput:
    """One batch run's output folder, shared by every engine: checked and prepared when made,
    written one pair at a time, and finished with the files in manifest order and the summary.

    Making it checks `identity` (a `pipeline_identity` dict) against `run.json` and the finished
    ids' image and text against `items` (OutputMismatchError, before anything is touched, unless
    overwrite=True, which first removes the old outputs), records the identity, drops a torn
    results line and clears errors.jsonl (failed pairs are tried again). Then `todo` lists the
    items without a result, in order, and `done` maps finished ids to their results lines.
    """

    def __init__(self, out_dir: Path, items: List[BatchItem], identity: dict, overwrite: bool = False):
        out_dir = Path(out_dir)
        self.out_dir, self.items, self.identity = out_dir, items, identity
        self.masks_dir = out_dir / "masks"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}; choose a writable folder") from None
        self.results_path, self.errors_path = out_dir / "results.jsonl", out_dir / "errors.jsonl"
        if overwrite:
            _clear_outputs(out_dir)
        earlier = _read_jsonl(self.results_path)
        _check_identity(out_dir, identity, bool(earlier) or (self.masks_dir.is_dir() and any(self.masks_dir.iterdir())))
        _check_inputs(out_dir, earlier, items)
        _write_json(out_dir / IDENTITY_FILE, identity)
        self.masks_dir.mkdir(exist_ok=True)
        self.order = {item.id: n for n, item in enumerate(items)}
        self.done: Dict[str, dict] = {r["id"]: r for r in earlier if r.get("id") in self.order}
        self.kept = [r for r in earlier if r.get("id") not in self.order]  # finished by an earlier run of another list: kept
        _rewrite_jsonl(self.results_path, self._in_order(self.done.values()) + self.kept)  # drops a torn line
        _rewrite_jsonl(self.errors_path, [])
        self.todo = [item for item in items if item.id not in self.done]
        self.errors: Dict[str, dict] = {}

    def _in_order(self, records: Iterable[dict]) -> List[dict]:
        return sorted(records, key=lambda r: self.order[r["id"]])

    def write(self, item: BatchItem, record: dict, mask) -> None:
        """Write one finished pair: its mask (bool [H, W]) as masks/<id>.png, then its results line."""
        mask_path = self.masks_dir / f"{item.id}.png"
        if self.masks_dir.resolve() not in mask_path.resolve().parents:
            raise OutputError(f"id {item.id!r} would write outside {self.masks_dir}")
        save_png(mask_path, mask)
        self.done[item.id] = record
        _append_line(self.results_path, record)

    def fail(self, item: BatchItem, reason: str) -> None:
        """Record one failed pair (its one-line reason) in errors.jsonl."""
        self.errors[item.id] = {"id": item.id, "image": str(item.image), "text": item.text, "error": reason}
        _append_line(self.errors_path, self.errors[item.id])

    def finish(self, elapsed: float, extra: Optional[dict] = None) -> dict:
        """Rewrite results.jsonl and errors.jsonl in manifest order and write summary.json (this run
        took `elapsed` seconds; `extra` adds engine-specific keys). Returns the summary."""
        done, errors = self.done, self.errors
        _rewrite_jsonl(self.results_path, self._in_order(done.values()) + self.kept)
        _rewrite_jsonl(self.errors_path, self._in_order(errors.values()))
        processed = len(self.todo) - len(errors)
        summary = {
            "total": len(self.items),
            "succeeded": len(done),
            "failed": len(errors),
            "skipped_already_done": len(self.items) - len(self.todo),
            "kept_from_other_lists": len(self.kept),
            "switched": sum(1 for r in done.values() if r["switched"]),
            "empty_masks": sum(1 for r in done.values() if r.get("mask_empty")),
            "with_unknown_words": sum(1 for r in done.values() if r.get("unknown_words")),
            "processed_this_run": processed,
            "seconds_this_run": round(elapsed, 3),
            "pairs_per_second": round(processed / elapsed, 3) if elapsed > 0 and processed else None,
            "gate": self.identity["gate"] is not None,
            "model": self.identity["model"]["name"],
            "run": self.identity,
            **(extra or {}),
        }
        _write_json(self.out_dir / "summary.json", summary)
        return summary


def result_record(item: BatchItem, result) -> dict:
    """The results.jsonl line of one finished pair (`result`: its `Result`)."""
    return {
        "id": item.id,
        "image": str(item.image),
        "text": item.text,
        "answer": result.answer,
        "selected": result.selected_rank,
        "selected_slot": result.selected_slot,
        "selected_set": result.selected_ranks,
        "objects": result.object_count,
        "switched": result.switched,
        "p_fail": result.p_fail,
        "p_no_target": result.p_no_target,
        "scores": result.scores,
        "mask": encode_mask(result.mask),
        "mask_empty": result.mask_empty,
        "unknown_words": result.unknown_words,
        "truncated_to_tokens": result.truncated_to_tokens,
        "notes": result.notes,
        "timings_ms": result.timings,
    }


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _check_identity(out_dir: Path, identity: dict, has_results: bool) -> None:
    """Stop when `out_dir` holds results of a run with another identity, or of unknown identity."""
    recorded_path = out_dir / IDENTITY_FILE
    if not recorded_path.is_file():
        if has_results:
            raise OutputMismatchError(
                f"{out_dir} holds results without a record of the settings that made them ({IDENTITY_FILE}); "
                f"rerun with --overwrite to replace them, or choose another --out"
            )
        return
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = {"unreadable": True}
    differences = identity_differences(recorded, identity)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise OutputMismatchError(
            f"{out_dir} holds results made with other settings ({shown}); rerun with --overwrite to replace "
            f"them, or choose another --out"
        )


def _check_inputs(out_dir: Path, earlier: List[dict], items: List[BatchItem]) -> None:
    """Stop when a finished id of `out_dir` was made for another image or text than this run's pair."""
    wanted = {item.id: item for item in items}
    changed = [
        (r["id"], r.get("image"), str(wanted[r["id"]].image), r.get("text"), wanted[r["id"]].text)
        for r in earlier
        if r.get("id") in wanted and (r.get("image"), r.get("text")) != (str(wanted[r["id"]].image), wanted[r["id"]].text)
    ]
    if changed:
        rid, old_image, new_image, old_text, new_text = changed[0]
        what = (f"text {shorten_text(old_text or '', 40)} -> {shorten_text(new_text, 40)}" if old_text != new_text
                else f"image {old_image} -> {new_image}")
        more = f" and {len(changed) - 1} more id(s)" if len(changed) > 1 else ""
        raise OutputMismatchError(
            f"{out_dir} holds results for other inputs under the same ids (id {rid!r}: {what}{more}); rerun with "
            f"--overwrite to replace them, or choose another --out"
        )


def _clear_outputs(out_dir: Path) -> None:
    """Remove a batch run's outputs from `out_dir`: first the claims (summary, results, errors),
    then the masks (moved aside, then deleted), then the identity; other files are left alone."""
    (out_dir / "summary.json").unlink(missing_ok=True)
    for name in ("results.jsonl", "errors.jsonl"):
        if (out_dir / name).exists():
            _rewrite_jsonl(out_dir / name, [])
    masks_dir = out_dir / "masks"
    if masks_dir.is_dir():
        masks_dir.rename(out_dir / f".masks-replaced-{os.getpid()}")
    for aside in out_dir.glob(".masks-replaced-*"):  # this run's, and any a killed run left
        shutil.rmtree(aside)
    (out_dir / IDENTITY_FILE).unlink(missing_ok=True)
