"""RefShapes as a dataset of ReferringSamples (pure functions of seed, split and image index), and
its writer to the SeqTR layout."""
from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union, overload

import numpy as np

from ...errors import InputError, OutputError
from ...fileio import atomic_write
from ...rle import encode_mask
from ...visualize import save_png
from ..refcoco import write_seqtr
from ..sample import ReferringSample
from .grammar import ExpressionMaker
from .render import render_scene
from .scene import Scene
from .vocabulary import MODES

MIN_EXPRESSIONS, MAX_EXPRESSIONS = 2, 4  # expressions drawn per image

def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic): a well-spread hash."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class RefShapes(Sequence[ReferringSample]):
    """The pairs of `num_images` generated images, 2-4 per image, as ReferringSamples.

    split: any name (it seeds the data: "train" and "val" give different scenes); seed: a
    non-negative int; image_size: (H, W) in pixels; mode: "ris" (one target per expression)
    or "gres" (also multi-target and no-target expressions). Sample ids are
    f"{split}_{image:06d}_{k}" and image ids f"{split}_{image:06d}". Scenes are generated on
    demand; the last `cache_size` are cached, so the samples of one image share one generation.
    `scene(image)` gives the whole scene (all instance masks and attributes).
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        seed: int = 0,
        image_size: Tuple[int, int] = (256, 256),
        mode: str = "ris",
        cache_size: int = 4,
    ) -> None:
        if not isinstance(split, str) or not split:
            raise InputError(f"split: expected a non-empty str, got {split!r}")
        if not isinstance(num_images, int) or num_images < 0:
            raise InputError(f"num_images: expected an int >= 0, got {num_images!r}")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed: expected an int >= 0, got {seed!r}")
        if len(image_size) != 2 or min(image_size) < 64:
            raise InputError(f"image_size: expected (H, W) with both sides >= 64 pixels, got {image_size!r}")
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        self.split = split
        self.num_images = num_images
        self.seed = seed
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mode = mode
        self.cache_size = cache_size
        self._split_key = zlib.crc32(split.encode("utf-8"))
        key = ((seed * 0x100000001B3) ^ (self._split_key << 32)) & 0xFFFFFFFFFFFFFFFF
        hashes = _mix64(np.arange(num_images, dtype=np.uint64) ^ np.uint64(key))
        self._counts = (MIN_EXPRESSIONS + hashes % np.uint64(MAX_EXPRESSIONS - MIN_EXPRESSIONS + 1)).astype(np.int64)
        self._starts = np.concatenate(([0], np.cumsum(self._counts)))
        self._cached_scene = functools.lru_cache(maxsize=cache_size)(self._generate_scene)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_cached_scene"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cached_scene = functools.lru_cache(maxsize=self.cache_size)(self._generate_scene)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @overload
    def __getitem__(self, index: int) -> ReferringSample: ...

    @overload
    def __getitem__(self, index: slice) -> List[ReferringSample]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[ReferringSample, List[ReferringSample]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"RefShapes indices must be int or slice, not {type(index).__name__}")
        position = int(index) + len(self) if index < 0 else int(index)
        if not 0 <= position < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        image = int(np.searchsorted(self._starts, position, side="right")) - 1
        k = position - int(self._starts[image])
        expression = self.scene(image).expressions[k]
        return ReferringSample(
            id=f"{self.split}_{image:06d}_{k}",
            split=self.split,
            image=functools.partial(self._image_copy, image),
            text=expression.text,
            target_mask=functools.partial(self._target_mask, image, k),
            image_id=f"{self.split}_{image:06d}",
            num_targets=len(expression.targets),
            instance_masks=functools.partial(self._instance_masks, image, k),
        )

    def expressions_per_image(self, image: int) -> int:
        """How many samples image `image` has (2-4), known without generating it."""
        return int(self._counts[image])

    def scene(self, image: int) -> Scene:
        """The generated scene of image `image` (0 <= image < num_images), from the cache if recent."""
        if not 0 <= image < self.num_images:
            raise IndexError(f"image index {image} out of range for {self.num_images} images")
        return self._cached_scene(int(image))

    def _generator(self, image: int, stream: int) -> np.random.Generator:
        """The Generator of one image's stream (0: drawing, 1: expressions of this mode)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self._split_key, image, stream]))

    def _generate_scene(self, image: int) -> Scene:
        """Generate image `image`: the drawing does not depend on the mode, the expressions do."""
        pixels, masks, objects = render_scene(self._generator(image, 0), *self.image_size)
        maker = ExpressionMaker(objects, self.image_size, self._generator(image, 1 + MODES.index(self.mode)))
        expressions = maker.expressions(self.expressions_per_image(image), self.mode)
        pixels.flags.writeable = False
        masks.flags.writeable = False
        return Scene(pixels, masks, objects, expressions)

    def _image_copy(self, image: int) -> np.ndarray:
        return self.scene(image).image.copy()

    def _target_mask(self, image: int, k: int) -> np.ndarray:
        return self.scene(image).target_mask(k)

    def _instance_masks(self, image: int, k: int) -> np.ndarray:
        scene = self.scene(image)
        return scene.masks[list(scene.expressions[k].targets)]


def write_refshapes(out_dir: Path, datasets: Sequence[RefShapes]) -> Path:
    """Write `datasets` to disk in the SeqTR layout that `refcoco.read_seqtr` reads.

    Images go to `out_dir/images/<image_id>.png` (lossless, so they read back identical);
    the annotations of all datasets go to ONE file, `out_dir/refshapes.json`, a
    {split: [entry, ...]} object with one entry per sample, in dataset order: image_id
    (the str f"{split}_{image:06d}"), file_name, expressions [text], mask (COCO RLE of the
    target mask), num_targets. Each dataset needs its own split name. Also writes
    `out_dir/manifest.jsonl`, one line per sample (id, image relative to out_dir, text,
    num_targets), for `deris-rerank batch --manifest`. Returns the annotation file's path.
    """
    out_dir = Path(out_dir).expanduser()
    images_dir = out_dir / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {images_dir}: {exc.strerror or exc}; choose a writable folder") from None
    splits: Dict[str, List[Dict[str, object]]] = {}
    manifest: List[str] = []
    for dataset in datasets:
        if dataset.split in splits:
            raise InputError(
                f"write_refshapes: two datasets have split {dataset.split!r}; give each its own split name"
            )
        entries = splits[dataset.split] = []
        for image in range(dataset.num_images):
            scene = dataset.scene(image)
            image_id = f"{dataset.split}_{image:06d}"
            file_name = f"{image_id}.png"
            save_png(images_dir / file_name, scene.image)
            for k, expression in enumerate(scene.expressions):
                entries.append({
                    "image_id": image_id,
                    "file_name": file_name,
                    "expressions": [expression.text],
                    "mask": encode_mask(scene.target_mask(k)),
                    "num_targets": len(expression.targets),
                })
                manifest.append(json.dumps({"id": f"{image_id}_{k}", "image": f"images/{file_name}", "text": expression.text,
                                            "num_targets": len(expression.targets)}))
    written = write_seqtr(splits, out_dir / "refshapes.json")
    try:
        atomic_write(out_dir / "manifest.jsonl", lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in manifest), encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write {out_dir / 'manifest.jsonl'}: {exc.strerror or exc}; choose a writable folder") from None
    return written
