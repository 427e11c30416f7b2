"""Fuyu: a Persimmon decoder whose |SPEAKER| token embeddings are replaced by linear patch embeddings.

Differs from Llama in: LayerNorm (with bias) instead of RMSNorm; fused QKV with bias in Megatron's
per-head interleaved [q_h | k_h | v_h] row order; LayerNorm over the head dim of q and k (one per
layer, shared by all heads); rotary on the first half of each head only (rotate-half pairing,
base 25000); squared-ReLU MLP with biases; untied LM head; no vision encoder at all.
See fuyu-spec.md §6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import KVCache
from model.config import FuyuConfig


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """positions (B, T) → cos, sin (B, 1, T, R), computed in float32 then cast (as the reference)."""
    exponent = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponent)  # (R/2,)
    theta = positions[..., None].float() * inv_freq  # (B, T, R/2)
    emb = torch.cat((theta, theta), dim=-1)[:, None]  # (B, 1, T, R): dim i pairs with i + R/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D); the rest pass through (GPT-NeoX rotate_half)."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    half1, half2 = rot[..., : R // 2], rot[..., R // 2:]
    rotated = torch.cat((-half2, half1), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        D, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.head_dim = cfg.num_attention_heads, d
        self.query_key_value = nn.Linear(D, 3 * D)
        self.dense = nn.Linear(D, D)
        self.q_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, slots, layer: int):
        B, T, D = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # (B, T, H, 3, d) → q, k, v each (B, T, H, d)
        q, k = self.q_layernorm(q), self.k_layernorm(k)  # over the head dim, before rotary
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:  # cache holds post-LayerNorm, post-rotary keys
            k, v = cache.update(layer, slots, k, v)
        # mask None: plain causal (no padding, nothing cached); scale 1/sqrt(d) as the reference.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.dense(y.transpose(1, 2).reshape(B, T, D))  # (B, H, T, d) → (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, slots, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(valid: torch.Tensor, q_slots: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S) for queries at q_slots (T,) over S key slots.

    valid (B, S) says which slots hold real tokens. A query may see slot j iff j ≤ its own slot and
    j is valid; every query also sees itself so that pad rows stay finite (their output is unused).
    """
    k_slot = torch.arange(valid.shape[1], device=valid.device)[None, :]
    q_slot = q_slots[:, None]
    mask = (k_slot <= q_slot) & valid[:, None, None, :]  # (B, 1, T, S)
    return mask | (k_slot == q_slot)


class Fuyu(nn.Module):
    def __init__(self, cfg: FuyuConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision_embed_tokens = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings (B, T, D) with the k-th |SPEAKER| slot (row-major) holding patch k's projection."""
        x = self.embed_tokens(input_ids)
        if patches is None or patches.shape[0] == 0:
            return x
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if n_slots != patches.shape[0]:
            raise ValueError(f"{patches.shape[0]} image patches for {n_slots} image placeholder tokens")
        weight = self.vision_embed_tokens.weight
        patch_emb = self.vision_embed_tokens(patches.to(weight.device, weight.dtype))  # (P, D)
        return x.masked_scatter(slots[..., None], patch_emb.to(x.dtype))

    def hidden(self, input_ids, positions, valid=None, cache: KVCache | None = None, patches=None):
        """Final-LayerNorm hidden states (B, T, D).

        positions (B, T) are rotary positions; valid (B, T) marks real (non-pad) tokens, None = all.
        With a cache the tokens go into the next free slots and attend to everything cached before.
        """
        B, T = input_ids.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        x = self.embed(input_ids, patches)
        if cache is None:
            slots = torch.arange(T, device=x.device)
            mask = None if bool(valid.all()) else attention_mask(valid.bool(), slots)
        else:
            slots = cache.next_slots(T)
            mask = attention_mask(cache.mark_valid(slots, valid.bool()), slots)
        h = self.layers_forward(x, positions, mask, cache, slots)
        if cache is not None:
            cache.advance(T)
        return h

    def layers_forward(self, x, positions, mask, cache, slots):
        """The decoder stack on embeddings x (B, T, D); mask None means plain causal attention."""
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, slots, i)
        return self.final_layernorm(x)

    def forward(self, input_ids, positions, valid=None, cache: KVCache | None = None, patches=None):
        """Logits (B, T, V) in the activation dtype (the reference never upcasts them)."""
        return self.lm_head(self.hidden(input_ids, positions, valid, cache, patches))

    # --- batch-level API: `batch` is a preprocess.FuyuBatch or anything with the same fields ---

    def logits(self, batch) -> torch.Tensor:
        """Logits (B, T, V) of a left-padded batch, positions derived from the attention mask."""
        ids, mask, patches = _unpack(batch, self.embed_tokens.weight.device)
        return self(ids, position_ids(mask), mask, None, patches)

    def loss(self, batch, labels: torch.Tensor) -> torch.Tensor:
        """Causal-LM cross entropy; labels (B, T) aligned with input_ids, -100 ignored."""
        logits = self.logits(batch)
        labels = labels.to(logits.device)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def generate(self, batch, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        """New token ids (B, N), N ≤ max_new_tokens; rows that finished early are padded with EOS."""
        from model.generate import generate

        ids, mask, patches = _unpack(batch, self.embed_tokens.weight.device)
        return generate(self, ids, mask, patches, max_new_tokens, **sampling)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad-aware rotary positions (B, T): the first real token of each row is 0 (pads get 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _unpack(batch, device):
    get = batch.get if isinstance(batch, dict) else lambda k: getattr(batch, k, None)
    ids = get("input_ids").to(device)
    mask = get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    patches = get("image_patches")
    if isinstance(patches, (list, tuple)):  # the reference processor's per-sample [1, N, 2700] list
        patches = torch.cat([p.reshape(-1, p.shape[-1]) for p in patches]) if patches else None
    return ids, mask, None if patches is None else patches.to(device)
