"""Our own PyTorch Fuyu: network, KV cache, generation and checkpoint loading. No transformers."""

from model.cache import KVCache
from model.config import FuyuConfig
from model.errors import CheckpointError
from model.fuyu import Fuyu, position_ids
from model.generate import generate, sample
from model.weights import load_pretrained

__all__ = ["CheckpointError", "Fuyu", "FuyuConfig", "KVCache", "generate", "load_pretrained",
           "position_ids", "sample"]
