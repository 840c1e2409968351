"""Old import path of `TextContext` (kept for existing code): now `deris_rerank.venice.text_context`."""
from .venice.text_context import TEXT_FIELDS, TextContext, pooled_text

__all__ = ["TEXT_FIELDS", "TextContext", "pooled_text"]
