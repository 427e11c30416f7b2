"""Our own PyTorch Fuyu: network, KV cache, generation and checkpoint loading. No transformers."""

from fuyu.model.cache import KVCache, position_ids
from fuyu.model.config import FuyuConfig
from fuyu.model.errors import CheckpointError
from fuyu.model.fuyu import Fuyu
from fuyu.model.generate import decode_step, encode_prefix, generate, logits, loss, prefill, sample
from fuyu.model.weights import load_pretrained

__all__ = ["CheckpointError", "Fuyu", "FuyuConfig", "KVCache", "decode_step", "encode_prefix", "generate",
           "load_pretrained", "logits", "loss", "position_ids", "prefill", "sample"]
