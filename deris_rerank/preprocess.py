"""DeRIS inputs and answer: image and text preparation, referring scores, final mask.

Images (upstream val pipeline): decode with OpenCV semantics (EXIF orientation applied),
resize the ORIGINAL image twice with cv2 bilinear on uint8 (384 px for Swin, 224 px for
BEiT-3, aspect ratio not kept), then normalise with the ImageNet mean/std in RGB order.
The result is float32 CHW, bit-identical to upstream's `HierResize` + `Normalize`.

Text: upstream's `clean_string`, then the BEiT-3 sentencepiece model with XLM-R/fairseq ids
(id = sentencepiece id + 1; bos 0, pad 1, eos 2, unk 3), reproduced without transformers.

Answer: referring score = softmax(refer_logits)[..., 0]; final mask = union over candidates
with score > threshold of sigmoid(mask_logits) >= 0.5 at 384 px, resized to the original
size with cv2 INTER_NEAREST semantics.
"""
from __future__ import annotations

import io
import operator
import os
import re
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import sentencepiece
import torch
from PIL import Image, ImageOps

from .fileio import require_file
from .errors import CheckpointError, InputError

IMAGE_SIZE = 384
IMAGE_SIZE_LO = 224
IMAGE_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGE_STD_RGB = (58.395, 57.12, 57.375)

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3

# Largest image file `load_image` decodes, in pixels: Pillow's decompression-bomb error
# threshold, 2 * PIL.Image.MAX_IMAGE_PIXELS at its default (89,478,485), written out so that
# a changed Pillow setting does not move it.
MAX_IMAGE_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

_RGB_EXPECTED = "expected a uint8 NumPy array of shape (H, W, 3) in RGB order"
_SOURCES_EXPECTED = (
    "expected a file path, a PIL.Image or a uint8 NumPy array (H, W, 3) in RGB order, "
    "or a torch tensor [3, H, W] (uint8, or floating in [0, 1])"
)
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# FF then a byte that starts a marker: not 00 (stuffing), D0-D7 (restart) or FF (fill)
_JPEG_MARKER = re.compile(b"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_EOI = 0xD9
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM and SOI carry no length field
# mmcv.imnormalize: float64 copies of the float32 constants, applied by OpenCV in place.
_MEAN_F64 = np.float64(np.asarray(IMAGE_MEAN_RGB, dtype=np.float32).reshape(1, -1))
_INV_STD_F64 = 1.0 / np.float64(np.asarray(IMAGE_STD_RGB, dtype=np.float32).reshape(1, -1))

_DROPPED_CHARACTERS = re.compile(r"[.,'!?\"()*#:;]")
_SPACED_CHARACTERS = str.maketrans({"-": " ", "/": " "})
_MASK_TOKEN = "<mask>"


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
        their end marker are refused as truncated;
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
        return _checked_rgb_array(source, "image")
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
    if not data:
        raise InputError(f"image file {path} is empty (0 bytes); expected an image file")
    header = _read_image_header(path, data)
    if header is not None and header[1] * header[2] > MAX_IMAGE_PIXELS:
        kind, width, height = header
        raise InputError(
            f"image file {path} is a {width}x{height} {kind} ({width * height:,} pixels), above the "
            f"decompression-bomb limit of {MAX_IMAGE_PIXELS:,} pixels; downscale it first"
        )
    truncated_kind = _truncated_format(data)
    if truncated_kind is not None:
        raise InputError(
            f"image file {path} is truncated (the {truncated_kind} data stops before its end marker); "
            "re-download or re-export it"
        )
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


def _read_image_header(path: Path, data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) from the header Pillow parses, or None if Pillow does not identify the data.

    Pillow's own decompression-bomb error (raised when its `Image.MAX_IMAGE_PIXELS` setting
    is lower than ours) becomes an InputError too; Pillow's DecompressionBombWarning (images
    above its warning threshold, half of ours) is left as it is.
    """
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            return str(header.format), width, height
    except Image.DecompressionBombError as exc:
        raise InputError(f"image file {path} is too large to decode safely: {_one_line(exc).rstrip('.')}; downscale it first") from None
    except (OSError, SyntaxError, ValueError):
        return None


def _truncated_format(data: bytes) -> Optional[str]:
    """The format name, "JPEG" or "PNG", when `data` is such a file cut before its end marker, else None."""
    if data.startswith(_JPEG_SIGNATURE):
        return None if _jpeg_reaches_end(data) else "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return None if _png_reaches_end(data) else "PNG"
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


def _png_reaches_end(data: bytes) -> bool:
    """Whether the PNG chunks in `data` (length, type, payload, CRC) run whole up to IEND."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        position += 12 + length
        if kind == b"IEND":
            return position <= len(data)
    return False


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


def _checked_rgb_array(array: np.ndarray, what: str) -> np.ndarray:
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


def prepare_images(
    rgb: np.ndarray, image_size: int = IMAGE_SIZE, image_size_lo: int = IMAGE_SIZE_LO
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two normalised model inputs of one image, exactly as upstream's pipeline.

    rgb: uint8 [H, W, 3] RGB. Returns (img [3, image_size, image_size] for Swin,
    img_mini [3, image_size_lo, image_size_lo] for BEiT-3), float32 CPU tensors, both
    resized from `rgb` itself.
    """
    rgb = _checked_rgb_array(rgb, "prepare_images")
    image_size = _positive_int(image_size, "image_size")
    image_size_lo = _positive_int(image_size_lo, "image_size_lo")
    return _resize_and_normalise(rgb, image_size), _resize_and_normalise(rgb, image_size_lo)


def _resize_and_normalise(rgb: np.ndarray, size: int) -> torch.Tensor:
    """cv2 bilinear resize on uint8 to size x size, then (x - mean) / std -> float32 [3, size, size].

    Upstream normalises BGR after converting it to RGB; every step is per channel, so
    working on RGB from the start gives the same bits.
    """
    resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    image = resized.astype(np.float32)
    cv2.subtract(image, _MEAN_F64, image)
    cv2.multiply(image, _INV_STD_F64, image)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def clean_text(text: str) -> str:
    """Upstream's `clean_string`: lower-case, drop . , ' ! ? " ( ) * # : ; and turn - and / into spaces."""
    return _DROPPED_CHARACTERS.sub("", text.lower()).translate(_SPACED_CHARACTERS)


class TextNotes(NamedTuple):
    """What `Beit3Tokenizer.describe` found: unknown words, content tokens, tokens kept."""

    unknown_words: List[str]
    tokens: int
    kept_tokens: int

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.tokens


def shorten_text(text: str, limit: int = 80) -> str:
    """`text` quoted, cut to `limit` characters with the full length noted: 'man on the le...' (50000 chars)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


class Beit3Tokenizer:
    """BEiT-3 text tokenizer: upstream's cleaning, then the BEiT-3 sentencepiece model.

    Reproduces `transformers.XLMRobertaTokenizer(beit3.spm)`'s `tokenize` followed by
    `convert_tokens_to_ids` (transformers 4.44.2, upstream's pin) with `sentencepiece` alone:
      - the strings <s> <pad> </s> <unk> <mask> in the text stay whole tokens with ids
        0, 1, 2, 3 and piece_count + 1; <mask> also removes the white space on its left;
      - every other stretch of text goes through `encode(out_type=str)`; a piece gets id
        spm_id + 1, except a piece that sentencepiece maps to 0 (unknown), which gets 3.
    """

    def __init__(self, spm_path: Union[str, os.PathLike]) -> None:
        path = require_file(spm_path, "sentencepiece model")
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot read sentencepiece model {path}: {exc}") from None
        self.mask_id = self._processor.GetPieceSize() + 1
        self._special_ids = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID, _MASK_TOKEN: self.mask_id}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self._special_ids)) + ")")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit: the pieces (shifted by one) plus <s>/<pad>/</s>/<unk> and <mask>."""
        return self.mask_id + 1

    def content_ids(self, text: str) -> List[int]:
        """Ids of the cleaned text, without bos/eos/padding. Raises InputError if there are none."""
        if not isinstance(text, str):
            raise InputError(f"text: expected a str, got {type(text).__name__}")
        cleaned = clean_text(text)
        if not cleaned.strip():
            raise InputError(f"text {text!r} is empty after cleaning; expected at least one word")
        chunks = [chunk for chunk in self._special_split.split(cleaned) if chunk]
        for index in range(1, len(chunks)):
            if chunks[index] == _MASK_TOKEN:
                chunks[index - 1] = chunks[index - 1].rstrip()
        ids: List[int] = []
        for chunk in chunks:
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
            elif chunk:
                spm_ids = self._processor.piece_to_id(self._processor.encode(chunk, out_type=str))
                ids.extend(spm_id + 1 if spm_id != 0 else UNK_ID for spm_id in spm_ids)
        if not ids:
            raise InputError(f"text {text!r} gives no tokens; expected at least one word")
        return ids

    def encode(self, text: str, max_tokens: int, warn: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """One expression -> (ids [T], padding_mask [T]), int64 with T = max_tokens.

        ids = [0, content ids (at most max_tokens - 2)..., 2, 1...]; padding_mask is 1 at
        padding and 0 at real tokens (bos and eos included). Warns when text is truncated
        (unless warn=False; `describe` says so too).
        """
        ids, padding_mask, truncated = self._pack([text], max_tokens)
        if truncated and warn:
            warnings.warn(f"text truncated to max_tokens - 2 = {max_tokens - 2} tokens: {shorten_text(text)}", stacklevel=2)
        return ids[0], padding_mask[0]

    def describe(self, text: str, max_tokens: int) -> TextNotes:
        """What the model will not see of `text`: words outside the vocabulary, and truncation.

        unknown_words: the cleaned words (in order, without repeats) with a piece that the
        sentencepiece model maps to <unk>; tokens: the number of content tokens;
        kept_tokens: how many of them fit in max_tokens (bos and eos take two places).
        """
        content = self.content_ids(text)
        unknown: List[str] = []
        unk = self._processor.unk_id()
        for word in clean_text(text).split():
            if word not in self._special_ids and word not in unknown and unk in self._processor.encode(word):
                unknown.append(word)
        return TextNotes(unknown, len(content), min(len(content), max_tokens - 2))

    def encode_batch(self, texts: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Several expressions -> (ids [B, T], padding_mask [B, T]), int64, rows as in `encode`.

        Warns once when any text is truncated.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise InputError("texts: expected a non-empty list of strings")
        ids, padding_mask, truncated = self._pack(texts, max_tokens)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} texts truncated to max_tokens - 2 = {max_tokens - 2} tokens",
                stacklevel=2,
            )
        return ids, padding_mask

    def _pack(self, texts: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(ids [B, T], padding_mask [B, T], number of truncated texts)."""
        max_tokens = _positive_int(max_tokens, "max_tokens")
        if max_tokens < 3:
            raise InputError(f"max_tokens: expected an int >= 3 (bos, one token, eos), got {max_tokens!r}")
        contents = [self.content_ids(text) for text in texts]
        keep = max_tokens - 2
        rows = [[BOS_ID] + content[:keep] + [EOS_ID] for content in contents]
        lengths = torch.tensor([len(row) for row in rows])
        ids = torch.tensor([row + [PAD_ID] * (max_tokens - len(row)) for row in rows], dtype=torch.int64)
        padding_mask = (torch.arange(max_tokens) >= lengths[:, None]).to(torch.int64)
        truncated = sum(len(content) > keep for content in contents)
        return ids, padding_mask, truncated


def refer_scores(refer_logits: torch.Tensor) -> torch.Tensor:
    """Referring score of each candidate: softmax(refer_logits, -1)[..., 0].

    refer_logits: [..., N, 2], class 0 = "referred". Returns [..., N] probabilities, in the
    logits' dtype (float32 for float16/bfloat16 logits).
    """
    if not torch.is_tensor(refer_logits) or not refer_logits.is_floating_point() or refer_logits.shape[-1:] != (2,):
        raise InputError("refer_logits: expected a floating-point tensor of shape [..., N, 2]")
    return _working_precision(refer_logits).softmax(dim=-1)[..., 0]


def deris_answer_mask(
    mask_logits_384: torch.Tensor, scores: torch.Tensor, score_threshold: float, mask_threshold: float = 0.5
) -> torch.Tensor:
    """DeRIS's final mask: union over candidates with score > score_threshold of sigmoid(logits) >= mask_threshold.

    mask_logits_384: [..., N, S, S] mask logits (upstream's 384 px `pred_masks`);
    scores: [..., N] referring scores. Returns bool [..., S, S]; all False where no
    candidate's score is strictly above the threshold.
    """
    if not torch.is_tensor(mask_logits_384) or not mask_logits_384.is_floating_point() or mask_logits_384.dim() < 3:
        raise InputError("mask_logits_384: expected a floating-point tensor of shape [..., N, S, S]")
    if not torch.is_tensor(scores) or scores.shape != mask_logits_384.shape[:-2]:
        got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise InputError(
            f"scores: expected shape {tuple(mask_logits_384.shape[:-2])} to match mask_logits_384 "
            f"{tuple(mask_logits_384.shape)}, got {got}"
        )
    foreground = _working_precision(mask_logits_384).sigmoid() >= mask_threshold
    selected = (scores > score_threshold)[..., None, None]
    return (foreground & selected).any(dim=-3)


def resize_mask_nearest(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize [..., h, w] masks to [..., H, W] exactly as cv2.resize(..., INTER_NEAREST).

    size: (H, W). Values are copied, so the dtype is kept (bool in, bool out). OpenCV picks
    source index floor(i * (1 / (out / in))) in float64; torch's mode='nearest' uses a
    float32 scale and picks a different row or column for some sizes (e.g. 384 -> 34).
    """
    if not torch.is_tensor(mask) or mask.dim() < 2 or 0 in mask.shape[-2:]:
        raise InputError("mask: expected a tensor of shape [..., h, w] with h, w > 0")
    if not isinstance(size, Sequence) or len(size) != 2:
        raise InputError(f"size: expected (H, W), got {size!r}")
    height, width = _positive_int(size[0], "size[0] (H)"), _positive_int(size[1], "size[1] (W)")
    rows = _nearest_source_index(mask.shape[-2], height).to(mask.device)
    cols = _nearest_source_index(mask.shape[-1], width).to(mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


def _nearest_source_index(source_len: int, target_len: int) -> torch.Tensor:
    """int64 [target_len] source indices of OpenCV's nearest-neighbour resize along one axis."""
    step = 1.0 / (target_len / source_len)
    return (torch.arange(target_len, dtype=torch.float64) * step).floor().long().clamp_(max=source_len - 1)


def _working_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for softmax/sigmoid; float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _positive_int(value: object, name: str) -> int:
    """`value` as an int if it is a positive integer (Python or NumPy), else raise InputError."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise InputError(f"{name}: expected a positive int, got {value!r}")
    return number
