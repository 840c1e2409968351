"""Readers of RefCOCO-family referring-segmentation annotations, and a writer of the SeqTR layout.

Every reader returns one `ReferringSample` per (expression, target) pair, in file order. Images
are looked up as `images_dir / file_name` (a COCO train2014 folder for RefCOCO/+/g and gRefCOCO).
Masks are decoded only when `target_mask()` is called and come back as bool [H, W] at the
original image size. Polygons are rasterised by `pycocotools.mask.frPyObjects` (the call
upstream makes; pycocotools is needed only for polygons), every RLE is expanded by
`deris_rerank.rle`, which decodes exactly as `pycocotools.mask.decode`.

Layouts (field names as the upstream DeRIS loaders read them):

1. SeqTR / DeRIS mixed JSON (`annotations/mixed-seg/instances_nogoogle_withid.json`, also
   SeqTR's per-dataset `instances.json`): a JSON object {split name: [entry, ...]}; the mixed
   file's splits are train, val/testA/testB_refcoco_unc, val/testA/testB_refcocoplus_unc,
   val/test_refcocog_umd. An entry has
     image_id     int, the COCO image: file `COCO_train2014_%012d.jpg` (upstream ignores any other name)
     height, width  ints, the image size (upstream rasterises at the decoded image's size)
     expressions  list of str
     mask         polygons [[x1, y1, x2, y2, ...], ...] or RLE {"size": [H, W], "counts": str | list}
     bbox         [x, y, w, h]; id (COCO annotation id, `_withid` file); category_id
   and, only in files `write_seqtr` wrote: file_name (relative to images_dir) and num_targets.
   Upstream draws one expression per entry with `np.random.choice` at every load, also at
   evaluation (its "always the same for val/test" comment holds when each val/test entry
   carries one expression). Here every expression is its own pair, which is the same set of
   pairs when entries have one expression each. Id: `<split>_<entry index>_<expression index>`.
2. DeRIS gRefCOCO JSON (`annotations/grefs/instances.json`, read by
   `LoadImageAnnotationsFromFileGRES_TO`): the same {split: [entry, ...]} object with splits
   train, val, testA, testB, one entry per sentence (ReLA's records). An entry has
     image_id, height, width   as above (image `COCO_train2014_%012d.jpg`; file_name ignored)
     expressions  {"raw": str (or list of str), "sent_id", "ref_id"}
     annotations  [{"id", "bbox", "segmentation", "iscrowd", "category_id", "empty"}, ...];
                  a no-target sentence has one {"id": -1, "empty": true, "bbox": null, ...}
                  without segmentation
   The target is the union of the segmentations, read up to the first annotation without
   one (upstream concatenates the polygon lists and merges them; all False when none).
   num_targets = number of annotations in that union. Id: `<split>_<entry index>_<k>`.
3. refer layout (lichengunc/refer, henghuiding/gRefCOCO): `refs(<split_by>).p` (a Python 2
   pickle; gRefCOCO: `grefs(<split_by>).json` or `.p`) beside a COCO `instances.json`. A ref
   is {"ref_id", "image_id", "ann_id" (int; gRefCOCO: list, [-1] = no target), "split",
   "category_id", "sentences": [{"raw", "sent", "tokens", "sent_id"}, ...]}; instances.json
   has "images" [{"id", "file_name", "height", "width"}] and "annotations"
   [{"id", "image_id", "segmentation", "iscrowd", "bbox", "category_id"}]. Text is the
   sentence's "raw". gRefCOCO leaves crowd annotations out of the target, as grefer/ReLA do.
   Split names follow refer.py (testA also takes testAB refs, test takes every test* ref) and
   grefer.py (exact). Id: `<split>_<ref_id>_<sentence index>`. Pickles are read with an
   unpickler that refuses every class and function, so only plain data loads.

The text is the expression as written; the pipeline cleans it (upstream's `clean_string`).
"""
from __future__ import annotations

import functools
import json
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, OutputError, install_hint
from ..fileio import atomic_write
from ..images import load_image
from ..rle import decode_mask, encode_mask
from ..tokenizer import check_unicode
from .sample import ReferringSample

PathLike = Union[str, Path]

COCO_FILE_NAME = "COCO_train2014_%012d.jpg"
_REFS_FILE = re.compile(r"^g?refs\([^()]+\)\.(p|json)$")
_UNSAFE_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_WRITER_KEYS = frozenset(
    {"image_id", "file_name", "height", "width", "expressions", "mask", "bbox", "id", "category_id", "num_targets"}
)


# ----------------------------------------------------------------------------------- masks


def _pycocotools_mask():
    """pycocotools.mask, or an InputError that says how to install it."""
    try:
        from pycocotools import mask
    except ImportError:
        raise InputError(
            "polygon masks are rasterised with pycocotools, which is not installed: " + install_hint("data", "pycocotools")
        ) from None
    return mask


def _decode_target(
    polygons: Sequence[Sequence[float]],
    rles: Sequence[Mapping[str, Any]],
    size: Optional[Tuple[int, int]],
    image: Path,
    where: str,
) -> np.ndarray:
    """bool [H, W]: the union of `polygons` (one `pycocotools.mask.frPyObjects` call, as upstream;
    its RLEs expanded by `deris_rerank.rle`, which decodes as `pycocotools.mask.decode` does) and `rles`.

    size: (H, W) from the annotation; None reads it from the first RLE, else from the image.
    where: the file and entry, for error messages.
    """
    rle_parts = []
    for rle in rles:
        try:
            rle_parts.append(decode_mask(rle))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    if size is None:
        size = rle_parts[0].shape if rle_parts else load_image(image).shape[:2]
    height, width = size
    target = np.zeros((height, width), dtype=bool)
    if polygons:
        coco = _pycocotools_mask()
        try:
            polygon_rles = coco.frPyObjects(list(polygons), height, width)
        except Exception as exc:  # pycocotools raises bare Exception for input it does not support
            raise InputError(f"{where}: invalid polygon mask ({exc}); expected [[x1, y1, x2, y2, ...], ...]") from None
        for rle in polygon_rles:
            target |= decode_mask(rle)
    for part in rle_parts:
        if part.shape != (height, width):
            raise InputError(f"{where}: RLE mask size {list(part.shape)} differs from the image size {[height, width]}")
        target |= part
    return target


def _segmentation_parts(segmentation: Any, where: str) -> Tuple[list, list]:
    """(polygons, rles) of one mask field: a polygon list or an RLE dict."""
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return [], [segmentation]
    if isinstance(segmentation, list) and all(isinstance(polygon, list) for polygon in segmentation):
        return segmentation, []
    raise InputError(
        f"{where}: mask must be polygons [[x1, y1, x2, y2, ...], ...] or RLE {{\"size\": [H, W], \"counts\": ...}}, "
        f"got {type(segmentation).__name__}"
    )


def _decode_instances(parts: Sequence[Tuple[list, list]], size: Optional[Tuple[int, int]], image: Path, where: str) -> np.ndarray:
    """bool [K, H, W]: each referred instance's mask (`parts`: its polygons and RLEs), decoded as `_decode_target`."""
    masks = [_decode_target(polygons, rles, size, image, where) for polygons, rles in parts]
    if masks:
        return np.stack(masks)
    height, width = size if size is not None else load_image(image).shape[:2]
    return np.zeros((0, height, width), dtype=bool)


def _instance_masks(parts: Sequence[Tuple[list, list]], size: Optional[Tuple[int, int]], image: Path, where: str):
    """A picklable no-argument function returning the instances' masks (see `_decode_instances`)."""
    return functools.partial(_decode_instances, list(parts), size, image, where)


def _target_mask(polygons: list, rles: list, size: Optional[Tuple[int, int]], image: Path, where: str):
    """A picklable no-argument function returning the target mask (DataLoader workers get
    samples by pickling). With polygons, a missing pycocotools fails here, at read time."""
    if polygons:
        _pycocotools_mask()
    return functools.partial(_decode_target, polygons, rles, size, image, where)


# ------------------------------------------------------------------------------- file access


def _existing_file(path: PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{what} not found: {path} (check the path)")
    return path


def _images_dir(images_dir: PathLike) -> Path:
    images_dir = Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise InputError(f"images folder not found: {images_dir} (expected the folder holding the COCO train2014 images)")
    return images_dir


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} {path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _split_table(path: Path) -> Dict[str, Any]:
    """The {split name: [entry, ...]} object of a SeqTR-style or DeRIS gRefCOCO JSON file."""
    data = _read_json(_existing_file(path, "annotation file"), "annotation file")
    if _is_coco_instances(data):
        raise InputError(f"annotation file {path} is a COCO instances.json; pass the refs(...).p file beside it")
    if not isinstance(data, dict) or not all(isinstance(entries, list) for entries in data.values()):
        raise InputError(f"annotation file {path}: expected a JSON object mapping split names to lists of annotations")
    return data


def _is_coco_instances(data: Any) -> bool:
    return isinstance(data, dict) and {"images", "annotations"} <= data.keys()


def _split_entries(path: Path, split: str) -> List[Any]:
    table = _split_table(path)
    if split not in table:
        raise InputError(f"annotation file {path} has no split {split!r}; available: {', '.join(table) or 'none'}")
    return table[split]


def _image_path(images_dir: Path, file_name: Any, where: str) -> Path:
    """images_dir / file_name, refusing names that are absolute or climb out of images_dir."""
    if not isinstance(file_name, str) or not file_name:
        raise InputError(f"{where}: file_name must be a non-empty string, got {file_name!r}")
    for pure in (PurePosixPath(file_name), PureWindowsPath(file_name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise InputError(f"{where}: file_name {file_name!r} must be relative to the images folder, without '..'")
    return images_dir / file_name


def _coco_file_name(image_id: Any, where: str) -> str:
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise InputError(f"{where}: image_id must be an integer COCO image id, got {image_id!r}")
    return COCO_FILE_NAME % image_id


def _safe(text: Any) -> str:
    return _UNSAFE_ID_CHARACTERS.sub("-", str(text))


def _field(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise InputError(f"{where}: missing field {key!r}")
    return entry[key]


def _size(entry: Mapping[str, Any], where: str) -> Optional[Tuple[int, int]]:
    """(H, W) from the entry's height/width, or None when it has neither."""
    if "height" not in entry and "width" not in entry:
        return None
    height, width = _field(entry, "height", where), _field(entry, "width", where)
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise InputError(f"{where}: height and width must be positive integers, got {height!r} x {width!r}")
    return int(height), int(width)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _texts(expressions: Any, where: str) -> List[str]:
    if isinstance(expressions, str):
        expressions = [expressions]
    if not isinstance(expressions, list) or not expressions or not all(isinstance(text, str) for text in expressions):
        raise InputError(f"{where}: expressions must be a non-empty list of strings, got {expressions!r:.80}")
    return expressions


# ------------------------------------------------------------------------------ SeqTR layout


def _seqtr_samples(entries: List[Any], path: Path, images_dir: Path, split: str) -> List[ReferringSample]:
    samples = []
    for index, entry in enumerate(entries):
        where = f"annotation file {path}, {split}[{index}]"
        image_id = _field(entry, "image_id", where)
        file_name = entry["file_name"] if "file_name" in entry else _coco_file_name(image_id, where)
        image = _image_path(images_dir, file_name, where)
        num_targets = entry.get("num_targets", 1)
        if not _is_int(num_targets) or num_targets < 0:
            raise InputError(f"{where}: num_targets must be a non-negative integer, got {num_targets!r}")
        polygons, rles = _segmentation_parts(_field(entry, "mask", where), where)
        target_mask = _target_mask(polygons, rles, _size(entry, where), image, where)
        for k, text in enumerate(_texts(_field(entry, "expressions", where), where)):
            samples.append(ReferringSample(
                id=f"{_safe(split)}_{index}_{k}", split=split, image=image, text=text,
                target_mask=target_mask, image_id=str(image_id), num_targets=num_targets,
            ))
    return samples


def read_seqtr(annotations: PathLike, images_dir: PathLike, split: str) -> List[ReferringSample]:
    """The pairs of one split of a SeqTR-style JSON file (layout 1 of the module docstring).

    annotations: e.g. `.../annotations/mixed-seg/instances_nogoogle_withid.json`.
    images_dir: the folder of the images (COCO train2014). split: e.g. "val_refcoco_unc".
    """
    path = Path(annotations).expanduser()
    return _seqtr_samples(_split_entries(path, split), path, _images_dir(images_dir), split)


def list_splits(annotations: PathLike) -> List[str]:
    """The split names of a SeqTR-style or DeRIS gRefCOCO JSON file, in file order; for a
    refer-layout refs file (or a folder holding one), the splits its refs name."""
    path = Path(annotations).expanduser()
    refs_file = _refs_file(path)
    if refs_file is not None:
        return list(dict.fromkeys(str(ref.get("split")) for ref in _load_refs(refs_file) if isinstance(ref, dict)))
    return list(_split_table(path))


# ---------------------------------------------------------------------------- gRefCOCO JSON


def _grefcoco_samples(entries: List[Any], path: Path, images_dir: Path, split: str) -> List[ReferringSample]:
    samples = []
    for index, entry in enumerate(entries):
        where = f"annotation file {path}, {split}[{index}]"
        image_id = _field(entry, "image_id", where)
        image = _image_path(images_dir, _coco_file_name(image_id, where), where)
        expressions = _field(entry, "expressions", where)
        if not isinstance(expressions, dict):
            raise InputError(f"{where}: expressions must be an object {{\"raw\": ...}} (gRefCOCO layout), "
                             f"got {type(expressions).__name__}")
        texts = _texts(_field(expressions, "raw", where + ".expressions"), where)
        instances = _field(entry, "annotations", where)
        if not isinstance(instances, list):
            raise InputError(f"{where}: annotations must be a list, got {type(instances).__name__}")
        polygons, rles, parts = [], [], []
        for position, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise InputError(f"{where}: annotations[{position}] must be an object, got {type(instance).__name__}")
            segmentation = instance.get("segmentation")
            if segmentation is None:
                break
            instance_polygons, instance_rles = _segmentation_parts(segmentation, where)
            polygons += instance_polygons
            rles += instance_rles
            parts.append((instance_polygons, instance_rles))
        target_mask = _target_mask(polygons, rles, _size(entry, where), image, where)
        instance_masks = _instance_masks(parts, _size(entry, where), image, where)
        for k, text in enumerate(texts):
            samples.append(ReferringSample(
                id=f"{_safe(split)}_{index}_{k}", split=split, image=image, text=text,
                target_mask=target_mask, image_id=str(image_id), num_targets=len(parts), instance_masks=instance_masks,
            ))
    return samples


def read_grefcoco(annotations: PathLike, images_dir: PathLike, split: str) -> List[ReferringSample]:
    """The pairs of one split of gRefCOCO: multi-target and no-target expressions included.

    annotations: DeRIS's `annotations/grefs/instances.json` (layout 2, self-contained: no
    instances file needed), or gRefCOCO's own `grefs(unc).json` with `instances.json`
    beside it (layout 3). split: train, val, testA or testB.
    """
    path = Path(annotations).expanduser()
    if _REFS_FILE.match(path.name):
        return _refer_samples(path, _images_dir(images_dir), split)
    return _grefcoco_samples(_split_entries(path, split), path, _images_dir(images_dir), split)


# ----------------------------------------------------------------------------- refer layout


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or function; `name` is its dotted name."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not allowed")
        self.name = name


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only what needs no class or function: lists, dicts, tuples, sets, strings,
    bytes, numbers, booleans and None. Every global lookup (the only way a pickle reaches
    code) is refused."""

    def find_class(self, module: str, name: str):
        raise _RefusedGlobal(f"{module}.{name}")


def _load_refs(path: Path) -> List[Any]:
    """The list of refs of a refs(...).p / grefs(...).json file."""
    path = _existing_file(path, "refs file")
    if path.suffix == ".json":
        refs = _read_json(path, "refs file")
    else:
        try:
            with path.open("rb") as handle:
                refs = _PlainDataUnpickler(handle, encoding="utf-8", errors="replace").load()
        except _RefusedGlobal as exc:
            raise InputError(
                f"refusing to load refs file {path} for safety: the pickle calls {exc.name}, which could run "
                "code; only plain lists, dicts, strings and numbers are read"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot read refs file {path}: {exc.strerror or exc}") from None
        except Exception as exc:  # malformed pickle bytes fail in many ways (EOFError, KeyError, ValueError, ...)
            raise InputError(f"cannot read refs file {path}: not a valid pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(refs, list):
        raise InputError(f"refs file {path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _refs_file(path: Path) -> Optional[Path]:
    """The refs file `path` names: itself when it is called (g)refs(<split_by>).p/.json, the
    one such file inside it when it is a folder; None otherwise."""
    if path.is_dir():
        found = sorted(child for child in path.iterdir() if _REFS_FILE.match(child.name))
        if len(found) != 1:
            listed = ", ".join(child.name for child in found) or "none"
            raise InputError(f"folder {path} must hold exactly one refs(<split_by>).p or grefs(<split_by>).json "
                             f"file (found: {listed}); pass the file itself")
        return found[0]
    return path if _REFS_FILE.match(path.name) else None


def _refer_split_matches(requested: str, ref_split: str, generalized: bool) -> bool:
    """refer.py's split selection (testA also takes testAB, test takes every test*); exact for gRefCOCO."""
    if not generalized and requested in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and requested[-1] in ref_split
    if not generalized and requested == "test":
        return "test" in ref_split
    return ref_split == requested


def _index_by_id(records: Any, path: Path, key: str) -> Dict[Any, Dict[str, Any]]:
    if not isinstance(records, list):
        raise InputError(f"instances file {path}: {key!r} must be a list")
    index = {}
    for position, record in enumerate(records):
        index[_field(record, "id", f"instances file {path}, {key}[{position}]")] = record
    return index


def _record(index: Dict[Any, Dict[str, Any]], key: Any, what: str, instances_path: Path) -> Dict[str, Any]:
    if isinstance(key, bool) or not isinstance(key, (int, str)) or key not in index:
        raise InputError(f"{what} {key!r} is not in {instances_path}")
    return index[key]


def _refer_samples(refs_path: Path, images_dir: Path, split: str) -> List[ReferringSample]:
    generalized = refs_path.name.startswith("grefs")
    refs = _load_refs(refs_path)
    instances_path = _existing_file(refs_path.parent / "instances.json", "instances file (beside the refs file)")
    instances = _read_json(instances_path, "instances file")
    if not _is_coco_instances(instances):
        raise InputError(f"instances file {instances_path}: expected a COCO object with 'images' and 'annotations'")
    images = _index_by_id(instances["images"], instances_path, "images")
    annotations = _index_by_id(instances["annotations"], instances_path, "annotations")

    selected = []
    for position, ref in enumerate(refs):
        where = f"refs file {refs_path}, ref {position}"
        if _refer_split_matches(split, str(_field(ref, "split", where)), generalized):
            selected.append((where, ref))
    if not selected:
        available = dict.fromkeys(str(ref.get("split")) for ref in refs if isinstance(ref, dict))
        raise InputError(f"refs file {refs_path} has no split {split!r}; available: {', '.join(available) or 'none'}")

    samples = []
    for where, ref in selected:
        ref_id, image_id = _field(ref, "ref_id", where), _field(ref, "image_id", where)
        image_record = _record(images, image_id, f"{where}: image_id", instances_path)
        image_where = f"instances file {instances_path}, image {image_id}"
        image = _image_path(images_dir, _field(image_record, "file_name", image_where), image_where)
        ann_ids = _field(ref, "ann_id", where)
        ann_ids = [ann_id for ann_id in (ann_ids if isinstance(ann_ids, list) else [ann_ids]) if ann_id != -1]
        polygons, rles, parts = [], [], []
        for ann_id in ann_ids:
            annotation = _record(annotations, ann_id, f"{where}: ann_id", instances_path)
            if generalized and annotation.get("iscrowd"):
                continue
            ann_where = f"instances file {instances_path}, annotation {ann_id}"
            ann_polygons, ann_rles = _segmentation_parts(_field(annotation, "segmentation", ann_where), ann_where)
            polygons += ann_polygons
            rles += ann_rles
            parts.append((ann_polygons, ann_rles))
        target_mask = _target_mask(polygons, rles, _size(image_record, image_where), image, where)
        instance_masks = _instance_masks(parts, _size(image_record, image_where), image, where)
        sentences = _field(ref, "sentences", where)
        if not isinstance(sentences, list):
            raise InputError(f"{where}: sentences must be a list")
        for k, sentence in enumerate(sentences):
            sentence_where = f"{where}, sentence {k}"
            text = sentence.get("raw", sentence.get("sent")) if isinstance(sentence, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{sentence_where}: expected an object with a 'raw' (or 'sent') string")
            samples.append(ReferringSample(
                id=f"{_safe(split)}_{_safe(ref_id)}_{k}", split=split, image=image, text=text,
                target_mask=target_mask, image_id=str(image_id), num_targets=len(parts), instance_masks=instance_masks,
            ))
    return samples


def read_refer(
    refer_dir: PathLike, images_dir: PathLike, split: str, dataset: str = "refcoco", split_by: str = "unc"
) -> List[ReferringSample]:
    """The pairs of one split of the refer layout (layout 3 of the module docstring).

    refer_dir: the refer data root (holding `<dataset>/refs(<split_by>).p`) or the dataset
    folder itself. dataset: refcoco, refcoco+, refcocog, refclef or grefcoco (which reads
    `grefs(<split_by>).json`, or `.p`). split_by: unc, google, umd, berkeley.
    """
    refer_dir = Path(refer_dir).expanduser()
    prefix = "grefs" if dataset == "grefcoco" else "refs"
    names = [f"{prefix}({split_by}).p", f"{prefix}({split_by}).json"]
    for folder in (refer_dir, refer_dir / dataset):
        for name in names:
            if (folder / name).is_file():
                return _refer_samples(folder / name, _images_dir(images_dir), split)
    raise InputError(f"refer annotations not found: no {' or '.join(names)} in {refer_dir} or {refer_dir / dataset} "
                     "(expected the refer layout: refs(<split_by>).p beside instances.json)")


# ----------------------------------------------------------------------------- any layout


def load_split(spec: PathLike, images_dir: PathLike, split: str) -> List[ReferringSample]:
    """The pairs of one split, with the reader chosen from `spec`:

    - a file named `refs(<split_by>).p`/`.json` or `grefs(<split_by>).json`/`.p`, or a folder
      holding exactly one: the refer layout, with `instances.json` beside the refs file
      (gRefCOCO rules for `grefs`);
    - any other file: a JSON {split: [entry, ...]} object; the split's first entry decides:
      gRefCOCO (DeRIS) when it has "annotations" or its "expressions" is an object, SeqTR otherwise.
    """
    path = Path(spec).expanduser()
    refs_file = _refs_file(path)
    if refs_file is not None:
        return _refer_samples(refs_file, _images_dir(images_dir), split)
    entries = _split_entries(path, split)
    first = entries[0] if entries else {}
    is_grefcoco = isinstance(first, dict) and ("annotations" in first or isinstance(first.get("expressions"), dict))
    reader = _grefcoco_samples if is_grefcoco else _seqtr_samples
    return reader(entries, path, _images_dir(images_dir), split)


# ------------------------------------------------------------------------------------ writer


def _mask_array(mask: Any, height: Optional[int], width: Optional[int], where: str) -> np.ndarray:
    """bool [H, W] of a writer mask: an array or tensor, an RLE dict, or polygons (need height, width)."""
    if isinstance(mask, (dict, list)):
        polygons, rles = _segmentation_parts(mask, where)
        if polygons and (height is None or width is None):
            raise InputError(f"{where}: polygon masks need 'height' and 'width'")
        size = (height, width) if height is not None and width is not None else None
        return _decode_target(polygons, rles, size, Path(), where)
    try:
        rle = encode_mask(mask)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return decode_mask(rle)


def _bbox(mask: np.ndarray) -> List[float]:
    """[x, y, w, h] of the mask's set pixels, as pycocotools' toBbox; zeros when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def _seqtr_entry(annotation: Mapping[str, Any], position: int, where: str) -> Dict[str, Any]:
    if not isinstance(annotation, Mapping):
        raise InputError(f"{where}: expected a dict, got {type(annotation).__name__}")
    unknown = sorted(set(annotation) - _WRITER_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; allowed: {sorted(_WRITER_KEYS)}")
    image_id = _field(annotation, "image_id", where)
    if not (_is_int(image_id) or isinstance(image_id, str)):
        raise InputError(f"{where}: image_id must be an int or a string, got {image_id!r}")
    entry: Dict[str, Any] = {"image_id": int(image_id) if _is_int(image_id) else image_id}
    if "file_name" in annotation:
        _image_path(Path(), annotation["file_name"], where)
        entry["file_name"] = annotation["file_name"]
    else:
        _coco_file_name(entry["image_id"], where + " (no file_name given)")
    size = _size(annotation, where)
    mask = _mask_array(_field(annotation, "mask", where), *(size or (None, None)), where)
    if size is not None and mask.shape != size:
        raise InputError(f"{where}: mask shape {list(mask.shape)} differs from height x width {list(size)}")
    entry["height"], entry["width"] = int(mask.shape[0]), int(mask.shape[1])
    texts = _texts(_field(annotation, "expressions", where), where)
    entry["expressions"] = [check_unicode(text, f"{where}: expression") for text in texts]  # written as UTF-8
    bbox = annotation.get("bbox", None)
    if bbox is None:
        bbox = _bbox(mask)
    elif not (isinstance(bbox, Sequence) and len(bbox) == 4 and all(_is_number(value) for value in bbox)):
        raise InputError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
    entry["bbox"] = [float(value) for value in bbox]
    entry["mask"] = encode_mask(mask)
    numbers = {"id": annotation.get("id", position + 1)}
    numbers.update({key: annotation[key] for key in ("category_id", "num_targets") if key in annotation})
    for key, value in numbers.items():
        if not _is_int(value) or value < 0:
            raise InputError(f"{where}: {key} must be a non-negative integer, got {value!r}")
        entry[key] = int(value)
    return entry


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def write_seqtr(splits: Mapping[str, Sequence[Mapping[str, Any]]], path: PathLike) -> Path:
    """Write annotations as a SeqTR-style JSON file that `read_seqtr` (and upstream's loader) reads.

    splits: {split name: [annotation, ...]}, written in this order. An annotation is a dict with
      image_id      int (the image is then `COCO_train2014_%012d.jpg`, the name upstream reads) or str
      file_name     optional str, the image relative to images_dir (required for a str image_id)
      expressions   non-empty list of str (a str is taken as one expression); one pair each
      mask          bool/integer array or tensor [H, W], RLE dict, or polygons (then height and width)
      height, width optional ints; must equal the mask's size when given
      bbox          optional [x, y, w, h]; default: the tight box of the mask
      id            optional int annotation id; default: position in the split + 1
      category_id, num_targets  optional non-negative ints (num_targets defaults to 1 when read)
    Masks are stored as compressed COCO RLE, so `read_seqtr` returns exactly the masks given
    (polygons rasterised once, here, by pycocotools). The file is written atomically; its
    folder is created. Returns the path written.
    """
    path = Path(path).expanduser()
    if not isinstance(splits, Mapping):
        raise InputError(f"write_seqtr: splits must be a dict {{split name: [annotation, ...]}}, got {type(splits).__name__}")
    table = {}
    for split, annotations in splits.items():
        if not isinstance(split, str) or not split:
            raise InputError(f"write_seqtr: split names must be non-empty strings, got {split!r}")
        if isinstance(annotations, (str, bytes, Mapping)) or not isinstance(annotations, Sequence):
            raise InputError(f"write_seqtr: split {split!r} must be a list of annotation dicts")
        table[split] = [
            _seqtr_entry(annotation, position, f"write_seqtr {path}, {split}[{position}]")
            for position, annotation in enumerate(annotations)
        ]
    text = json.dumps(table, separators=(",", ":"), ensure_ascii=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write annotation file {path}: {exc.strerror or exc}; choose a writable folder") from None
    return path
