"""FLOP and byte arithmetic, and the machine's own rates to compare with: streaming read, GEMM.

Decode bandwidth is the weight bytes one step reads (everything but the input embedding and the
patch projection) divided by the step time, compared with a streaming read of as many bytes;
prefill is compared with plain F.linear doing the same GEMMs.
"""

from __future__ import annotations

import torch

from fuyu.model import Fuyu, FuyuConfig


def stream_read(device: torch.device, nbytes: float):
    """(fn, bytes): fn sums a float32 buffer (as big as `nbytes`, within 128 MiB, well past the
    CPU caches, and 1 GiB) as many times as it takes to read about `nbytes`: the machine's
    streaming read rate over as much data as the measurement it is compared with."""
    size = int(min(1 << 30, max(128 << 20, nbytes)))
    x = torch.ones(size // 4, device=device)
    n = max(1, round(nbytes / (x.numel() * 4)))

    def read():
        for _ in range(n):
            x.sum()
    return read, n * x.numel() * 4


def layer_gemms(cfg: FuyuConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of one decoder layer's four Linear GEMMs over `tokens` rows."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    return [(tokens, D, 3 * D), (tokens, D, D), (tokens, D, I), (tokens, I, D)]


def gemm_work(cfg: FuyuConfig, tokens: int, device: torch.device, dtype: torch.dtype, layers: int | None = None,
              packed: bool = False):
    """(fn, flops): torch's GEMMs on random operands doing one prefill's layer GEMMs (of `layers`
    layers, default all): F.linear, or with `packed` oneDNN's pre-packed weights (CPU; None where
    oneDNN cannot pack them). The faster of the two is the rate a prefill of this shape could reach."""
    from fuyu.model.kernels import PackedLinear, can_pack

    ops = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype))
           for m, k, n in layer_gemms(cfg, tokens)]
    layers = cfg.num_hidden_layers if layers is None else layers
    flops = layers * sum(2 * m * k * n for m, k, n in layer_gemms(cfg, tokens))
    if packed:
        if device.type != "cpu" or not can_pack(ops[0][1]):
            return None, flops
        mods = []
        for a, b in ops:
            lin = torch.nn.Linear(b.shape[1], b.shape[0], bias=False, device="meta")
            lin.weight = torch.nn.Parameter(b, requires_grad=False)
            mods.append((a, PackedLinear(lin)))

        def packed_gemms():
            with torch.inference_mode():
                for _ in range(layers):
                    for a, m in mods:
                        m(a)
        return packed_gemms, flops

    def gemms():
        for _ in range(layers):
            for a, b in ops:
                torch.nn.functional.linear(a, b)
    return gemms, flops


def prefill_flops(cfg: FuyuConfig, tokens: int, patches: int) -> float:
    """Matmul FLOPs of a prefill: layer GEMMs, causal attention (QKᵀ and PV over the lower
    triangle, 2·T²·D a layer) and the patch projection. The LM head is not part of it."""
    gemms = sum(2 * m * k * n for m, k, n in layer_gemms(cfg, tokens))
    attention = 2 * tokens * tokens * cfg.hidden_size
    return cfg.num_hidden_layers * (gemms + attention) + 2 * patches * cfg.patch_dim * cfg.hidden_size


def decode_bytes(model: Fuyu) -> int:
    """Bytes of weights one decode step reads: all but the input embedding and patch projection
    (packed CPU Linear weights and quantized ones included: they are not parameters, and the
    quantized ones are buffers)."""
    from fuyu.model.kernels import PackedLinear

    skip = {"embed_tokens.weight", "vision_embed_tokens.weight", "vision_embed_tokens.bias"}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    held = sum(t.numel() * t.element_size() for n, t in tensors if n not in skip and t.device.type != "meta")
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    return held + packed
