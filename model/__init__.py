"""Our own PyTorch Fuyu: network, KV cache, generation and checkpoint loading. No transformers."""

from fuyu.model.cache import KVCache
from fuyu.model.config import FuyuConfig
from fuyu.model.errors import CheckpointError
from fuyu.model.fuyu import Fuyu, position_ids
from fuyu.model.generate import generate, sample
from fuyu.model.weights import load_pretrained

__all__ = ["CheckpointError", "Fuyu", "FuyuConfig", "KVCache", "generate", "load_pretrained",
           "position_ids", "sample"]
