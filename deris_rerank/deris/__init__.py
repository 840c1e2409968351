"""DeRIS in plain PyTorch: Swin perception, BEiT-3 cognition, loopback decoder."""
from .config import Beit3Config, DerisConfig, SwinConfig

__all__ = ["Beit3Config", "DerisConfig", "SwinConfig"]
