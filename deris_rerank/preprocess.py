"""Compatibility re-exports: the names that used to live here, now in their own modules.

images.py (decoding), transforms.py (model inputs, mask resizing), tokenizer.py (BEiT-3
tokenizer), deris/answer.py (referring scores) and candidates.py (DeRIS's answer mask).
"""
from .candidates import deris_answer_mask
from .deris.answer import refer_scores
from .images import MAX_IMAGE_PIXELS, ImageSource, load_image
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Beit3Tokenizer, TextNotes, clean_text, shorten_text
from .transforms import IMAGE_MEAN_RGB, IMAGE_STD_RGB, prepare_images, resize_mask_nearest

__all__ = [
    "BOS_ID", "EOS_ID", "IMAGE_MEAN_RGB", "IMAGE_STD_RGB", "MAX_IMAGE_PIXELS", "PAD_ID", "UNK_ID", "Beit3Tokenizer",
    "ImageSource", "TextNotes", "clean_text", "deris_answer_mask", "load_image", "prepare_images", "refer_scores",
    "resize_mask_nearest", "shorten_text",
]
