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

import operator
import os
import re
import warnings
from pathlib import Path
from typing import List, Sequence, Tuple, Union

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

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

_RGB_EXPECTED = "expected a uint8 NumPy array of shape (H, W, 3) in RGB order"
# mmcv.imnormalize: float64 copies of the float32 constants, applied by OpenCV in place.
_MEAN_F64 = np.float64(np.asarray(IMAGE_MEAN_RGB, dtype=np.float32).reshape(1, -1))
_INV_STD_F64 = 1.0 / np.float64(np.asarray(IMAGE_STD_RGB, dtype=np.float32).reshape(1, -1))

_DROPPED_CHARACTERS = re.compile(r"[.,'!?\"()*#:;]")
_SPACED_CHARACTERS = str.maketrans({"-": " ", "/": " "})
_MASK_TOKEN = "<mask>"


def load_image(source: ImageSource) -> np.ndarray:
    """Load an image as uint8 [H, W, 3] RGB, C-contiguous.

    source: a file path (decoded like upstream: `cv2.imdecode(..., IMREAD_COLOR)`, which
    applies the EXIF orientation, turns grey into 3 channels and drops alpha), a PIL image
    (EXIF orientation applied, converted to RGB) or a uint8 [H, W, 3] RGB array (returned
    as is). Anything else raises InputError.
    """
    if isinstance(source, (str, os.PathLike)):
        return _decode_image_file(Path(source))
    if isinstance(source, Image.Image):
        try:
            upright = ImageOps.exif_transpose(source)
            return np.array(upright.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise InputError(f"cannot read the PIL image: {exc}") from None
    if isinstance(source, np.ndarray):
        return _checked_rgb_array(source, "image")
    raise InputError(
        f"image: expected a file path, a PIL.Image or a uint8 NumPy array (H, W, 3) in RGB order, "
        f"got {type(source).__name__}"
    )


def _decode_image_file(path: Path) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB with OpenCV (EXIF orientation applied)."""
    if not path.is_file():
        raise InputError(f"image file not found: {path} (expected an existing image file)")
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if encoded.size else None
    except (OSError, cv2.error) as exc:
        raise InputError(f"cannot read image file {path}: {exc}") from None
    if bgr is None:
        raise InputError(f"cannot decode image file {path}: expected an image format OpenCV reads (JPEG, PNG, ...)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _checked_rgb_array(array: np.ndarray, what: str) -> np.ndarray:
    """Return `array` C-contiguous if it is uint8 [H, W, 3] with H, W > 0, else raise InputError."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{what}: {_RGB_EXPECTED}, got {type(array).__name__}")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        hint = " (channels first? use array.transpose(1, 2, 0))" if array.ndim == 3 and array.shape[0] == 3 else ""
        raise InputError(f"{what}: {_RGB_EXPECTED}, got a {array.dtype} array of shape {array.shape}{hint}")
    return np.ascontiguousarray(array)


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

    def encode(self, text: str, max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One expression -> (ids [T], padding_mask [T]), int64 with T = max_tokens.

        ids = [0, content ids (at most max_tokens - 2)..., 2, 1...]; padding_mask is 1 at
        padding and 0 at real tokens (bos and eos included). Warns when text is truncated.
        """
        ids, padding_mask, truncated = self._pack([text], max_tokens)
        if truncated:
            warnings.warn(f"text truncated to max_tokens - 2 = {max_tokens - 2} tokens: {text!r}", stacklevel=2)
        return ids[0], padding_mask[0]

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
