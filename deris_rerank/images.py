"""Image decoding: a path, PIL image, NumPy array or torch tensor -> uint8 RGB [H, W, 3].

Decodes with OpenCV semantics (as upstream's pipeline), applies the EXIF orientation, converts
every PIL mode (16-bit, palette, CMYK, 1-bit, alpha) to RGB, refuses truncated JPEG/PNG files
and decompression bombs, and raises InputError with one line naming the input otherwise.
"""
from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError

# Largest image file `load_image` decodes, in pixels (about 179 megapixels, 0.54 GB as RGB):
# our own limit, the only one that applies. Its value is that of Pillow's default
# decompression-bomb error threshold (2 * 89,478,485), written out; Pillow's own setting and its
# warning (at half of it) play no part, as Pillow only reads the header.
MAX_IMAGE_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

_RGB_EXPECTED = "expected a uint8 NumPy array of shape (H, W, 3) in RGB order"
_SOURCES_EXPECTED = (
    "expected a file path, a PIL.Image or a uint8 NumPy array (H, W, 3) in RGB order, "
    "or a torch tensor [3, H, W] (uint8, or floating in [0, 1])"
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, s3://, ...
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# FF then a byte that starts a marker: not 00 (stuffing), D0-D7 (restart) or FF (fill)
_JPEG_MARKER = re.compile(b"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_EOI = 0xD9
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM and SOI carry no length field


def load_image(source: ImageSource) -> np.ndarray:
    """Load an image as uint8 [H, W, 3] RGB, C-contiguous, in its displayed orientation.

    source:
      - a file path (str or os.PathLike, `~` expanded), decoded like upstream with
        `cv2.imdecode(..., IMREAD_COLOR)`: EXIF orientation applied, grey, grey + alpha,
        palette and 1-bit images turned into 3 channels, alpha dropped (not blended),
        16-bit samples scaled to 8 bits as value >> 8, CMYK JPEGs converted by OpenCV.
        Before decoding, Pillow reads the header (only the header) and files above
        MAX_IMAGE_PIXELS pixels are refused; formats Pillow cannot identify go to OpenCV
        unchecked (OpenCV caps them at 2**30 pixels). JPEG and PNG files that stop before
        their end marker are refused as truncated, and a PNG signature followed by anything
        but PNG chunks as not a valid PNG. A URL (https://...) is refused: nothing is
        fetched from the network;
      - a PIL image: EXIF orientation applied (`ImageOps.exif_transpose`), then converted
        to RGB as OpenCV does for files: alpha dropped, 16-bit grey (modes I;16*, and I
        holding 0..65535) scaled as value >> 8; CMYK and other modes through Pillow's
        `convert("RGB")`. Mode F (float) is refused: its value range is unknown;
      - a uint8 NumPy array [H, W, 3] in RGB order, returned as is (made C-contiguous);
      - a torch tensor [3, H, W] (channels first, any device): uint8 values 0..255, or
        floating values in [0, 1] turned into round(x * 255) clipped to 0..255 (computed
        in float32, in float64 for float64 input). Values outside [-0.5, 1.5] mean the
        tensor is not in [0, 1] (0..255 or mean/std normalised) and are refused.
    Anything else (other types, layouts, dtypes, empty images, unreadable files) raises
    InputError with a one-line message.
    """
    if isinstance(source, (str, os.PathLike)):
        return _decode_image_file(source)
    if isinstance(source, Image.Image):
        return _rgb_from_pil(source)
    if isinstance(source, np.ndarray):
        return checked_rgb_array(source, "image")
    if torch.is_tensor(source):
        return _rgb_from_tensor(source)
    hint = " (file contents? pass the path, or Image.open(io.BytesIO(data)))" if isinstance(source, bytes) else ""
    raise InputError(f"image: {_SOURCES_EXPECTED}, got {type(source).__name__}{hint}")


def _decode_image_file(source: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB with OpenCV (EXIF orientation applied)."""
    name = os.fsdecode(source)
    if not name:
        raise InputError("image path is empty; expected the path of an image file")
    path = Path(name).expanduser()
    if _URL.match(name) and not path.exists():
        raise InputError(f"image {name!r} is a URL, and images are not fetched from the network: download the file "
                         "and pass its path")
    if path.is_dir():
        raise InputError(f"image path {path} is a directory; expected an image file")
    if not path.exists():
        raise InputError(f"image file not found: {path} (check the path)")
    if not path.is_file():
        raise InputError(f"image path {path} is not a regular file; expected an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or _one_line(exc)}") from None
    return load_image_bytes(data, str(path))


def load_image_bytes(data: bytes, path: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file's contents `data` to uint8 [H, W, 3] RGB exactly as `load_image` decodes
    the file (EXIF orientation, modes, truncation and decompression-bomb checks).

    path: the name messages give the data (an upload's file name). max_pixels: refuse images above
    this many pixels, read from the header before decoding (at most MAX_IMAGE_PIXELS, the
    decompression-bomb limit; a server may set less). Raises InputError with one line.
    """
    max_pixels = min(int(max_pixels), MAX_IMAGE_PIXELS)
    limit = "decompression-bomb limit" if max_pixels == MAX_IMAGE_PIXELS else "limit"
    if not data:
        raise InputError(f"image file {path} is empty (0 bytes); expected an image file")
    header = _read_image_header(data)
    if header is not None and header[1] * header[2] > max_pixels:
        kind, width, height = header
        raise InputError(
            f"image file {path} is a {width}x{height} {kind} ({width * height:,} pixels), above the "
            f"{limit} of {max_pixels:,} pixels; downscale it first"
        )
    damage = _damage(data)
    if damage is not None:
        raise InputError(f"image file {path} {damage}")
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise InputError(f"cannot decode image file {path}: {_one_line(exc)}") from None
    if bgr is None:
        if header is None:
            raise InputError(
                f"cannot decode image file {path}: not an image format OpenCV or Pillow reads "
                "(expected JPEG, PNG, BMP, WebP, TIFF, ...)"
            )
        raise InputError(
            f"cannot decode image file {path} ({header[0]}): OpenCV cannot read it (corrupt, or a format "
            "this OpenCV build lacks); convert it to PNG or JPEG, or pass Image.open(path) instead"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_image_header(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) from the header Pillow parses, or None if Pillow does not identify the data.

    Pillow's format plugins are asked in turn, as `Image.open` asks them (the common formats
    first), but without its decompression-bomb check: its warning ("could be decompression bomb DOS attack", above its
    `Image.MAX_IMAGE_PIXELS`) and error would speak before our own limit, which is checked on
    the size returned here (and without touching the process-wide warning filters, which decoding
    threads must not do).
    """
    Image.preinit()
    common = list(Image.ID)
    Image.init()
    prefix = data[:16]
    for kind in common + [kind for kind in Image.ID if kind not in common]:
        factory, accept = Image.OPEN[kind]
        try:  # a plugin's test may fail on data shorter than it reads (as in Image.open, that means "not this format")
            verdict = accept is None or accept(prefix)
            if not verdict or isinstance(verdict, str):  # a str: "looks like this format, but cannot be read"
                continue
            with factory(io.BytesIO(data)) as header:
                width, height = header.size
                return str(header.format), width, height
        except (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError, struct.error):
            continue
    return None


def _damage(data: bytes) -> Optional[str]:
    """What is wrong with a JPEG or PNG file that OpenCV might decode regardless, as the end of a
    sentence ("is truncated (...)", "is not a valid PNG (...)"), or None."""
    truncated = "is truncated (the {} data stops before its end marker); re-download or re-export it"
    if data.startswith(_JPEG_SIGNATURE) and not _jpeg_reaches_end(data):
        return truncated.format("JPEG")
    if data.startswith(_PNG_SIGNATURE):
        chunks = _png_chunks(data)
        if chunks == "invalid":
            return ("is not a valid PNG (it starts with the PNG signature, but what follows is not PNG data); "
                    "check where it came from, or re-export it")
        if chunks == "truncated":
            return truncated.format("PNG")
    return None


def _jpeg_reaches_end(data: bytes) -> bool:
    """Whether the first JPEG image in `data` reaches its EOI marker (FF D9).

    Walks the marker segments, skipping each one by its length field (so an EXIF thumbnail's
    own markers are never seen), and between them the entropy-coded data, where FF is always
    followed by 00 (stuffing), D0-D7 (restart) or FF (fill) unless a real marker starts.
    OpenCV 4.x decodes a truncated JPEG without an error, filling in the missing part.
    """
    position = 2  # just after SOI (FF D8)
    while True:
        marker = _JPEG_MARKER.search(data, position)
        if marker is None:
            return False
        code = data[marker.start() + 1]
        if code == _JPEG_EOI:
            return True
        if code in _JPEG_STANDALONE:
            position = marker.end()
            continue
        length = data[marker.end() : marker.end() + 2]
        if len(length) < 2:
            return False
        position = marker.end() + int.from_bytes(length, "big")


def _png_chunks(data: bytes) -> str:
    """How the PNG chunks in `data` (length, type, payload, CRC) run: "complete" (whole up to IEND),
    "truncated" (well-formed until the data stops) or "invalid" (the first is not IHDR, or a type is
    not four ASCII letters: not PNG data at all)."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if not kind.isalpha() or not kind.isascii() or (position == len(_PNG_SIGNATURE) and kind != b"IHDR"):
            return "invalid"
        position += 12 + length
        if kind == b"IEND":
            return "complete" if position <= len(data) else "truncated"
    return "truncated"


def _rgb_from_pil(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a PIL image in its displayed orientation (see `load_image`)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"image: the PIL image is empty ({width}x{height}); expected at least 1x1 pixel")
    if image.mode == "F":
        raise InputError(
            "image: a PIL image in mode F (32-bit float) has no known value range; "
            "convert it to mode L or RGB (8 bits) first"
        )
    try:
        upright = ImageOps.exif_transpose(image)
        if upright.mode == "I" or upright.mode.startswith("I;16"):
            return _grey16_to_rgb(np.asarray(upright), upright.mode)
        if upright.mode in ("P", "PA"):
            # through RGBA: Pillow warns when a palette with transparency goes straight to RGB
            return np.ascontiguousarray(np.asarray(upright.convert("RGBA"))[..., :3])
        return np.array(upright.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"image: cannot read the PIL image (mode {image.mode}, {width}x{height}): {_one_line(exc)}"
        ) from None


def _grey16_to_rgb(grey: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey [H, W] -> uint8 [H, W, 3] as OpenCV's IMREAD_COLOR does for files: value >> 8."""
    low, high = int(grey.min()), int(grey.max())
    if low < 0 or high > 65535:
        raise InputError(
            f"image: a PIL image in mode {mode} is read as 16-bit grey (0..65535), found values in "
            f"[{low}, {high}]; convert it to mode L or RGB (8 bits) first"
        )
    grey8 = (grey >> 8).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=2)


def _rgb_from_tensor(tensor: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a [3, H, W] torch tensor, uint8 or floating in [0, 1] (see `load_image`)."""
    shape, dtype = tuple(tensor.shape), str(tensor.dtype)
    if tensor.dim() != 3 or shape[0] != 3 or 0 in shape:
        raise InputError(f"image: {_SOURCES_EXPECTED}, got a {dtype} tensor of shape {shape}{_tensor_hint(shape)}")
    tensor = tensor.detach()
    if tensor.is_floating_point():
        values = tensor if tensor.dtype == torch.float64 else tensor.float()
        if not bool(torch.isfinite(values).all()):
            raise InputError(f"image: the {dtype} tensor holds NaN or infinite values; expected values in [0, 1]")
        low, high = values.min().item(), values.max().item()
        if low < -0.5 or high > 1.5:
            raise InputError(
                f"image: a floating tensor must hold values in [0, 1], found values in [{low:.4g}, {high:.4g}] "
                "(0..255? divide by 255 or pass a uint8 tensor; normalised? undo the mean/std first)"
            )
        tensor = (values * 255).round_().clamp_(0, 255).to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        hint = "" if tensor.dtype == torch.bool else " (values 0..255? use tensor.to(torch.uint8))"
        raise InputError(f"image: {_SOURCES_EXPECTED}, got a {dtype} tensor of shape {shape}{hint}")
    return np.ascontiguousarray(tensor.cpu().permute(1, 2, 0).numpy())


def _tensor_hint(shape: Tuple[int, ...]) -> str:
    """A hint for a torch tensor whose shape is not [3, H, W], or "" when none is obvious."""
    if len(shape) == 3 and shape[-1] == 3:
        return " (channels last? use tensor.permute(2, 0, 1))"
    if len(shape) == 4 and shape[0] == 1 and shape[1] == 3:
        return " (a batch of one? use tensor[0])"
    if len(shape) == 2:
        return " (grey? use tensor.expand(3, -1, -1))"
    return ""


def checked_rgb_array(array: np.ndarray, what: str) -> np.ndarray:
    """Return `array` C-contiguous if it is uint8 [H, W, 3] with H, W > 0, else raise InputError."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{what}: {_RGB_EXPECTED}, got {type(array).__name__}")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise InputError(
            f"{what}: {_RGB_EXPECTED}, got a {array.dtype} array of shape {array.shape}{_array_hint(array)}"
        )
    return np.ascontiguousarray(array)


def _array_hint(array: np.ndarray) -> str:
    """A hint for a NumPy array that is not uint8 [H, W, 3], or "" when none is obvious."""
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        return " (channels first? use array.transpose(1, 2, 0))"
    if array.ndim == 3 and array.shape[2] == 4:
        return " (RGBA? drop alpha with array[..., :3])"
    if array.ndim == 2:
        return " (grey? use np.repeat(array[..., None], 3, axis=2))"
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype != np.uint8 and array.dtype != np.bool_:
        return " (convert it to uint8 values 0..255)"
    return ""


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (OpenCV's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
