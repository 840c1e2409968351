"""Pictures for people: a chosen mask over its image, a grid of all candidates, PNG files.

Images are uint8 RGB [H, W, 3] NumPy arrays and masks bool [H, W]; colours are RGB
triples. Outlines are drawn as a band of `BORDER_PX` pixels just inside a mask's edge,
so they never cover pixels outside the mask they belong to.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .errors import InputError, OutputError
from .fileio import atomic_write

Color = Tuple[int, int, int]

BORDER_PX = 2
MASK_COLOR: Color = (255, 64, 64)
OUTLINE_COLOR: Color = (64, 160, 255)
SELECTED_FRAME_COLOR: Color = (0, 220, 0)
TILE_FRAME_COLOR: Color = (40, 40, 40)
TILE_BACKGROUND: Color = (24, 24, 24)
LABEL_COLOR: Color = (255, 255, 255)
DEFAULT_LABEL_COLOR: Color = (255, 220, 0)
LABEL_BACKING: Color = (0, 0, 0)
# Colours a chosen mask may take in `decision_overlay`: the one farthest from the region it covers.
PALETTE: Tuple[Color, ...] = ((255, 64, 64), (0, 220, 0), (64, 160, 255), (255, 0, 255), (255, 220, 0), (0, 255, 255))
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise InputError(f"image must be uint8 [H, W, 3] RGB, got {image_rgb.dtype} {list(image_rgb.shape)}")
    return image_rgb


def _check_mask(mask: np.ndarray, shape: Tuple[int, int], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise InputError(f"{what} must have the image's shape {list(shape)}, got {list(mask.shape)}")
    return mask.astype(bool)


def _inner_border(mask: np.ndarray, width: int = BORDER_PX) -> np.ndarray:
    """bool [H, W]: the pixels of `mask` within `width` px (8-connected) of a non-mask pixel or the image edge."""
    kernel = np.ones((3, 3), np.uint8)
    eroded = cv2.erode(mask.astype(np.uint8), kernel, iterations=width, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & (eroded == 0)


def overlay(
    image_rgb: np.ndarray,
    mask: np.ndarray,
    outline: Optional[np.ndarray] = None,
    color: Color = MASK_COLOR,
    alpha: float = 0.5,
    outline_color: Color = OUTLINE_COLOR,
) -> np.ndarray:
    """`mask` tinted over the image with a solid 2-px border; `outline`'s border alone in another colour.

    image_rgb: uint8 [H, W, 3] RGB. mask, outline: bool [H, W]. alpha: weight of `color`
    inside the mask (0 = no tint, 1 = solid). The mask's border is drawn over the outline
    where the two meet. Returns a new uint8 [H, W, 3] array; the input is not modified.
    """
    image_rgb = _check_image(image_rgb)
    shape = image_rgb.shape[:2]
    mask = _check_mask(mask, shape, "mask")
    result = image_rgb.copy()
    tinted = (1.0 - alpha) * image_rgb[mask] + alpha * np.asarray(color, dtype=np.float64)
    result[mask] = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    if outline is not None:
        result[_inner_border(_check_mask(outline, shape, "outline"))] = outline_color
    result[_inner_border(mask)] = color
    return result


def decision_overlay(image_rgb: np.ndarray, mask: np.ndarray, default_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The picture of one answer: `mask` tinted and bordered in a colour that stands out from the
    pixels it covers, `default_mask` (DeRIS's own first choice, when the re-ranker switched away
    from it) outlined in a second contrasting colour, and a legend naming both in the top-left corner.

    image_rgb: uint8 [H, W, 3] RGB; mask, default_mask: bool [H, W]. Returns uint8 [H, W, 3].
    """
    image_rgb = _check_image(image_rgb)
    mask = _check_mask(mask, image_rgb.shape[:2], "mask")
    color = contrasting_color(image_rgb[mask])
    entries = [(color, "chosen" if mask.any() else "chosen (empty)")]
    outline_color = OUTLINE_COLOR
    if default_mask is not None:
        default_mask = _check_mask(default_mask, image_rgb.shape[:2], "default_mask")
        outline_color = contrasting_color(image_rgb[default_mask], avoid=(color,))
        entries.append((outline_color, "DeRIS top (outline)"))
    result = overlay(image_rgb, mask, outline=default_mask, color=color, outline_color=outline_color)
    _draw_legend(result, entries)
    return result


def contrasting_color(pixels: np.ndarray, avoid: Sequence[Color] = ()) -> Color:
    """The `PALETTE` colour farthest (RGB distance) from the mean of `pixels` [K, 3] and from every
    colour in `avoid`; with no pixels, the farthest from `avoid` alone (MASK_COLOR first)."""
    palette = np.asarray(PALETTE, np.float64)
    references = [np.asarray(c, np.float64) for c in avoid]
    if len(pixels):
        references.append(np.asarray(pixels, np.float64).reshape(-1, 3).mean(axis=0))
    if not references:
        return PALETTE[0]
    distance = np.min([np.linalg.norm(palette - r, axis=1) for r in references], axis=0)
    return PALETTE[int(np.argmax(distance))]


def _draw_legend(canvas: np.ndarray, entries: Sequence[Tuple[Color, str]]) -> None:
    """Swatch + text lines on a dark box in the top-left corner, in place; left out when the
    image is too small to hold it without covering most of it."""
    height, width = canvas.shape[:2]
    scale = float(np.clip(min(height, width) / 900, 0.35, 0.8))
    thickness = 1
    sizes = [cv2.getTextSize(text, _FONT, scale, thickness) for _, text in entries]
    line_h = max(h + b for (_, h), b in sizes) + 4
    swatch = line_h - 4
    box_w = 6 + swatch + 4 + max(w for (w, _), _ in sizes) + 6
    box_h = 4 + line_h * len(entries) + 2
    if box_w > 0.75 * width or box_h > 0.4 * height:
        return
    cv2.rectangle(canvas, (0, 0), (box_w, box_h), LABEL_BACKING, cv2.FILLED)
    for row, ((color, text), ((_, text_h), _)) in enumerate(zip(entries, sizes)):
        top = 4 + row * line_h
        cv2.rectangle(canvas, (6, top), (6 + swatch, top + swatch), color, cv2.FILLED)
        cv2.putText(canvas, text, (6 + swatch + 4, top + text_h + 1), _FONT, scale, LABEL_COLOR, thickness, cv2.LINE_AA)


def _fit_long_side(height: int, width: int, tile: int) -> Tuple[int, int]:
    """(height, width) scaled so the longer side is `tile` px, each at least 1 px."""
    scale = tile / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _put_label(canvas: np.ndarray, text: str, x: int, y: int, scale: float, color: Color, above: bool = False) -> None:
    """Write `text` on a dark box whose top-left corner is (x, y), or bottom-left when `above`; in place."""
    thickness = max(1, round(scale * 2))
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = thickness
    box_h = text_h + baseline + 2 * pad
    if above:
        y -= box_h
    cv2.rectangle(canvas, (x, y), (x + text_w + 2 * pad, y + box_h), LABEL_BACKING, cv2.FILLED)
    cv2.putText(canvas, text, (x + pad, y + pad + text_h), _FONT, scale, color, thickness, cv2.LINE_AA)


def candidate_grid(
    image_rgb: np.ndarray,
    masks: np.ndarray,
    scores: Sequence[float],
    selected: Union[int, Sequence[int]],
    default: int,
    columns: int = 5,
    tile: int = 256,
) -> np.ndarray:
    """All candidates side by side, one `tile` x `tile` cell each, row-major by index.

    image_rgb: uint8 [H, W, 3] RGB. masks: bool [N, H, W]. scores: N floats (DeRIS's).
    selected: the index of the final choice, or the indices of a set answer (possibly none),
    each framed in green; default: DeRIS's default (labelled "default"). Each cell holds the image, resized to `tile` px
    on its long side and centred, with that candidate's mask overlaid and the label
    "#index score". Returns uint8 [ceil(N / c) * tile, c * tile, 3] with c = min(columns, N).
    """
    image_rgb = _check_image(image_rgb)
    masks = np.asarray(masks)
    count = masks.shape[0] if masks.ndim == 3 else 0
    if masks.ndim != 3 or masks.shape[1:] != image_rgb.shape[:2] or count == 0:
        raise InputError(f"masks must be [N, H, W] with N >= 1 and the image's H, W, got {list(masks.shape)}")
    if len(scores) != count:
        raise InputError(f"got {len(scores)} scores for {count} masks")
    chosen = {selected} if isinstance(selected, (int, np.integer)) else set(selected)
    for name, index in [*(("selected", index) for index in sorted(chosen)), ("default", default)]:
        if not 0 <= index < count:
            raise InputError(f"{name} index {index} is out of range for {count} candidates")
    if columns < 1 or tile < 16:
        raise InputError(f"columns must be >= 1 and tile >= 16 px, got columns={columns}, tile={tile}")

    height, width = _fit_long_side(*image_rgb.shape[:2], tile)
    top, left = (tile - height) // 2, (tile - width) // 2
    small_image = cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = np.empty((rows * tile, columns * tile, 3), np.uint8)
    text_scale = tile / 512
    frame_px = max(2, tile // 32)
    for index in range(count):
        small_mask = cv2.resize(masks[index].astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        cell = np.empty((tile, tile, 3), np.uint8)
        cell[:] = TILE_BACKGROUND
        cell[top:top + height, left:left + width] = overlay(small_image, small_mask.astype(bool))
        if index in chosen:
            cv2.rectangle(cell, (0, 0), (tile - 1, tile - 1), SELECTED_FRAME_COLOR, 2 * frame_px)
        else:
            cv2.rectangle(cell, (0, 0), (tile - 1, tile - 1), TILE_FRAME_COLOR, 1)
        _put_label(cell, f"#{index} {float(scores[index]):.2f}", frame_px, frame_px, text_scale, LABEL_COLOR)
        if index == default:
            _put_label(cell, "default", frame_px, tile - 1 - frame_px, text_scale, DEFAULT_LABEL_COLOR, above=True)
        row, column = divmod(index, columns)
        grid[row * tile:(row + 1) * tile, column * tile:(column + 1) * tile] = cell
    return grid


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write `array` to `path` as a PNG, atomically (temp file + rename). Returns the path.

    array: uint8 [H, W, 3] RGB, or [H, W] uint8 (grayscale) or bool (False -> 0, True -> 255).
    Raises OutputError when the file cannot be written (missing or read-only folder, ...).
    """
    array = np.asarray(array)
    if array.size == 0:
        raise InputError(f"cannot save an empty {list(array.shape)} image as PNG to {path}")
    if array.ndim == 2 and array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8 and array.ndim == 2:
        pixels = array
    elif array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        pixels = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    else:
        raise InputError(f"PNG data must be uint8 [H, W, 3] RGB or [H, W] uint8/bool, got {array.dtype} {list(array.shape)}")
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise InputError(f"OpenCV could not encode a {list(array.shape)} image as PNG for {path}")
    try:
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))
    except OSError as exc:
        raise OutputError(f"cannot write PNG {path}: {exc.strerror or exc}; choose a writable path") from None
