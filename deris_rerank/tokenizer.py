"""The BEiT-3 text tokenizer: upstream's text cleaning, then the sentencepiece model.

Ids follow XLM-R/fairseq (id = sentencepiece id + 1; bos 0, pad 1, eos 2, unk 3), reproduced
without transformers. `describe` says what the model will not see of a text (unknown words,
truncation).
"""
from __future__ import annotations

import hashlib
import operator
import os
import re
import warnings
from typing import List, NamedTuple, Sequence, Tuple, Union

import sentencepiece
import torch

from .errors import CheckpointError, InputError
from .fileio import require_file

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3

_DROPPED_CHARACTERS = re.compile(r"[.,'!?\"()*#:;]")
_SPACED_CHARACTERS = str.maketrans({"-": " ", "/": " "})
_MASK_TOKEN = "<mask>"


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


def check_unicode(text: str, what: str = "text") -> str:
    """Return `text` if it is valid Unicode (it has a UTF-8 form), else raise InputError naming it.

    What fails is a lone surrogate such as '\\udcff': Python makes one of each byte that is not
    UTF-8 in a command-line argument or file name, and JSON can spell one ("\\udcff"). Such text
    cannot reach sentencepiece (or be written to a UTF-8 file), so it is refused here, at the
    door, with one line; `what` names the input in it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{what} {shorten_text(text)} is not valid Unicode text (character {exc.start + 1} is a lone surrogate, "
            f"{text[exc.start]!r}: a byte that was not UTF-8); give the expression in UTF-8"
        ) from None
    return text


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
        self.path = path
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot read sentencepiece model {path}: {exc}") from None
        self.mask_id = self._processor.GetPieceSize() + 1
        self._special_ids = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID, _MASK_TOKEN: self.mask_id}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self._special_ids)) + ")")

    @property
    def sha256(self) -> str:
        """Hex sha256 of the sentencepiece model (identifies the tokenizer in a run's identity)."""
        return hashlib.sha256(self._processor.serialized_model_proto()).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit: the pieces (shifted by one) plus <s>/<pad>/</s>/<unk> and <mask>."""
        return self.mask_id + 1

    def content_ids(self, text: str) -> List[int]:
        """Ids of the cleaned text, without bos/eos/padding. Raises InputError if there are none."""
        if not isinstance(text, str):
            raise InputError(f"text: expected a str, got {type(text).__name__}")
        cleaned = clean_text(check_unicode(text))
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
            warnings.warn(f"text truncated to max_tokens - 2 = {max_tokens - 2} tokens: {shorten_text(text)}", stacklevel=2)
        return ids[0], padding_mask[0]

    def encode_with_notes(self, text: str, max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, TextNotes]:
        """`encode` (without its warning) and `describe` of one expression, tokenizing it once."""
        content = self.content_ids(text)
        ids, padding_mask, _ = self._pack_contents([content], max_tokens)
        return ids[0], padding_mask[0], self._notes(text, content, max_tokens)

    def describe(self, text: str, max_tokens: int) -> TextNotes:
        """What the model will not see of `text`: words outside the vocabulary, and truncation.

        unknown_words: the cleaned words (in order, without repeats) with a piece that the
        sentencepiece model maps to <unk>; tokens: the number of content tokens;
        kept_tokens: how many of them fit in max_tokens (bos and eos take two places).
        """
        return self._notes(text, self.content_ids(text), max_tokens)

    def _notes(self, text: str, content: List[int], max_tokens: int) -> TextNotes:
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
        return self._pack_contents([self.content_ids(text) for text in texts], max_tokens)

    @staticmethod
    def _pack_contents(contents: Sequence[List[int]], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Content ids of B texts -> (ids [B, T], padding_mask [B, T], number truncated); T = max_tokens >= 3."""
        if not _is_int_at_least(max_tokens, 3):
            raise InputError(f"max_tokens: expected an int >= 3 (bos, one token, eos), got {max_tokens!r}")
        keep = max_tokens - 2
        rows = [[BOS_ID] + content[:keep] + [EOS_ID] for content in contents]
        lengths = torch.tensor([len(row) for row in rows])
        ids = torch.tensor([row + [PAD_ID] * (max_tokens - len(row)) for row in rows], dtype=torch.int64)
        padding_mask = (torch.arange(max_tokens) >= lengths[:, None]).to(torch.int64)
        truncated = sum(len(content) > keep for content in contents)
        return ids, padding_mask, truncated


def _is_int_at_least(value: object, minimum: int) -> bool:
    """True for a Python or NumPy integer >= minimum (bools are not counts)."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        return False
