"""Training a small BEiT-3-style tokenizer (a sentencepiece model) for a closed vocabulary."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import sentencepiece

from ..errors import InputError
from ..tokenizer import check_unicode


def train_word_tokenizer(texts: Sequence[str], path: Path, max_pieces: int = 126) -> Path:
    """Train a word-level sentencepiece model on `texts` and write it to `path`.

    Word-level suits a closed grammar (one token per word); `Beit3Tokenizer` maps its ids
    with BEiT-3's conventions (id = piece id + 1; bos 0, pad 1, eos 2, unk 3), so a model
    with P pieces needs a BEiT-3 token table of at least P + 2 rows. Words outside `texts`
    become <unk>.
    """
    words = {word for text in texts for word in check_unicode(text, "training text").split()}
    if not words:
        raise InputError("no text to train a tokenizer on")
    if len(words) + 3 > max_pieces:
        raise InputError(f"{len(words)} distinct words do not fit a {max_pieces}-piece tokenizer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(scratch) / "tokenizer"), model_type="word",
            vocab_size=len(words) + 3, hard_vocab_limit=False, minloglevel=2,
        )
        path.write_bytes((Path(scratch) / "tokenizer.model").read_bytes())
    return path
