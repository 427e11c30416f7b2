"""Fuyu: a Persimmon decoder whose |SPEAKER| token embeddings are replaced by linear patch embeddings.

Differs from Llama in: LayerNorm (with bias) instead of RMSNorm; fused QKV with bias in Megatron's
per-head interleaved [q_h | k_h | v_h] row order; LayerNorm over the head dim of q and k (one per
layer, shared by all heads); rotary on the first half of each head only (rotate-half pairing,
base 25000); squared-ReLU MLP with biases; untied LM head; no vision encoder at all.
The reference is transformers 4.57.6's Fuyu and Persimmon code:
https://github.com/huggingface/transformers/tree/v4.57.6/src/transformers/models/fuyu

Numerics with 16-bit weights: the residual stream, the LayerNorms and rotary run in float32 and
each matmul's input is rounded once to the weights' dtype. The reference rounds after every one of
those steps; ours stays closer to its float32 logits (tests/test_accuracy.py). In float32 both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuyu.model.cache import KVCache, LayerKV
from fuyu.model.config import FuyuConfig


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed, and returned, in float32 whatever the dtypes of x and the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D) in pairs (i, i + R/2); the rest pass through.

    (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin): the reference's x·cos + rotate_half(x)·sin
    with the same roundings in 16-bit (each product, then the sum), minus its two concatenations
    and the negated copy.
    """
    h = cos.shape[-1]
    x1, x2 = x[..., :h], x[..., h: 2 * h]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * h:]), -1)


DECODE_CHUNK = 1 << 20  # elements of a float32 copy of keys or values made at a time (4 MiB)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d, masked)·v for one query per row, q (B, H, 1, d), over the whole cache
    k, v (B, H, S, d), computed in float32 and rounded once at the end.

    For CPU decoding: SDPA's flash kernel is made for blocks of queries and costs 2.5–4× this
    for one (bf16, AMD EPYC: 0.64 vs 0.21 ms at 16 heads × 512 slots). The keys and values are
    widened to float32 a slice of slots at a time, so the copies stay small and cache-resident.
    (The CPU backend's C attention does all of this in one pass over the cache without the
    float32 copies: model/backend.py.)
    """
    S = k.shape[2]
    step = max(1, DECODE_CHUNK // (k.shape[0] * k.shape[1] * k.shape[3]))
    qf = q.float() * q.shape[-1] ** -0.5
    scores = torch.cat([torch.matmul(qf, k[:, :, j:j + step].float().transpose(-1, -2))
                        for j in range(0, S, step)], -1)
    weights = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    out = torch.matmul(weights[..., :step], v[:, :, :step].float())
    for j in range(step, S, step):
        out += torch.matmul(weights[..., j:j + step], v[:, :, j:j + step].float())
    return out.to(v.dtype)


def normalised(patches: torch.Tensor) -> torch.Tensor:
    """Patches as the model takes them: float ones as they are; uint8 ones (a processor's for a
    GPU, uploaded 4× smaller) normalised here, on their device, as the processor normalises on
    the CPU: v / 127.5 - 1 in float32, which is the reference's (v / 255 - 0.5) / 0.5 bit for bit."""
    if patches.dtype != torch.uint8:
        return patches
    return patches.float().div_(127.5).sub_(1)


class Attention(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        D, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.head_dim = cfg.num_attention_heads, d
        self.query_key_value = nn.Linear(D, 3 * D)
        self.dense = nn.Linear(D, D)
        self.q_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.k_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, kv: LayerKV, attend=None, prefill=None):
        """attend: one-query decode attention on the CPU in place of decode_attention, called the
        same way; its None means "not served" (the CPU backend's C attention: model/backend.py).
        prefill: for more than one new token, passes in place of the torch ops below, each
        returning None where it does not serve (the CPU backend's, in C):
        prefill.qkv_rows(qkv, attention, cos, sin, kv), the q/k LayerNorms, rotary and cache write
        in one pass, returning q and the cache's keys and values as kv.update does;
        prefill.attend_rows(q, k, v, window), the attention, returning (B, T, D)."""
        B, T, D = x.shape
        dt = x.dtype
        qkv = self.query_key_value(x)
        multi = prefill is not None and T > 1
        fast = prefill.qkv_rows(qkv, self, cos, sin, kv) if multi else None
        if fast is not None:
            q, k, v = fast
        else:
            qkv = qkv.view(B, T, self.n_heads, 3, self.head_dim).transpose(1, 2)
            # (B, H, T, 3, d): LayerNorm over the head dim, then rotary, in float32; q, k come out
            # contiguous (B, H, T, d), rounded once to the weights' dtype
            q = apply_partial_rotary(self.q_layernorm(qkv[..., 0, :]), cos, sin).to(dt)
            k = apply_partial_rotary(self.k_layernorm(qkv[..., 1, :]), cos, sin).to(dt)
            k, v = kv.update(k, qkv[..., 2, :])  # the cache holds post-LayerNorm, post-rotary keys
        mask = kv.window.mask
        if T == 1 and mask is not None and q.device.type == "cpu":
            y = None if attend is None else attend(q, k, v, mask)
            if y is None:
                y = decode_attention(q, k, v, mask)
        else:
            y = prefill.attend_rows(q, k, v, kv.window) if multi else None
            if y is not None:
                return self.dense(y)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.dense(y.transpose(1, 2).reshape(B, T, D))  # (B, H, T, d) → (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if torch.is_grad_enabled():  # autograd needs h itself for relu²'s backward
            return self.dense_4h_to_h(torch.relu(h).square())
        return self.dense_4h_to_h(h.relu_().square_())  # in place: no (T, 4D) temporaries


class Block(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv: LayerKV, attend=None, prefill=None):
        """x (B, T, D) float32: the residual stream; each sublayer runs in the weights' dtype."""
        dt = kv.k.dtype
        x = x + self.self_attn(self.input_layernorm(x).to(dt), cos, sin, kv, attend, prefill)
        y = self.mlp(self.post_attention_layernorm(x).to(dt))
        # x is this call's own: added to in place outside autograd, one fresh (T, D) float32 buffer
        # a layer fewer (its pages faulted in: ~2 ms at 1,074 tokens, 8B widths)
        return x + y if torch.is_grad_enabled() else x.add_(y)


class Fuyu(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision_embed_tokens = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # How decode steps run on the model's device beyond these torch ops: None, or the CPU
        # backend that loading picks for a model on the CPU (model/backend.py, weights.for_inference).
        # generate.decode_step hands it the step; this module never calls it.
        self.backend = None

    def embed(self, input_ids: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings (B, T, D) with the k-th |SPEAKER| slot (row-major) holding patch k's projection."""
        x = self.embed_tokens(input_ids)
        if patches is None or patches.shape[0] == 0:
            return x
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if n_slots != patches.shape[0]:
            raise ValueError(f"{patches.shape[0]} image patches for {n_slots} image placeholder tokens")
        patch_emb = self.vision_embed_tokens(normalised(patches.to(x.device)).to(x.dtype))  # (P, D)
        return x.masked_scatter(slots[..., None], patch_emb.to(x.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                patches: torch.Tensor | None = None, attend=None, prefill=None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, D) of tokens input_ids (B, T) at rotary positions (B, T).

        The tokens go into the slots the cache reserved for them (KVCache.append / step) and attend
        to what it holds. Hidden states, not logits: with a 262,144-word vocabulary, generation
        needs the LM head on one position per row (`self.lm_head(h)`; fuyu.model.generate).
        attend, prefill: the CPU backend's decode attention and prefill passes (see
        Attention.forward); None: the torch ops.
        """
        x = self.embed(input_ids, patches)
        dt = x.dtype
        x = x.float()  # the residual stream stays float32 (16-bit weights: fewer roundings than the reference)
        window = cache.window(input_ids.shape[1])
        cos, sin = cache.rotary(positions)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache.layer(i, window), attend, prefill)
        return self.final_layernorm(x).to(dt)
