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

from fuyu.model.cache import KVCache
from fuyu.model.config import FuyuConfig


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """positions (B, T) → cos, sin (B, 1, T, R/2), computed in float32 then cast (as the reference).

    Dims i and i + R/2 of a head share frequency i (rotate-half pairing), so half a table is enough.
    """
    exponent = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponent)  # (R/2,)
    theta = (positions[..., None].float() * inv_freq)[:, None]  # (B, 1, T, R/2)
    return theta.cos().to(dtype), theta.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D) in pairs (i, i + R/2); the rest pass through.

    (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin): the reference's x·cos + rotate_half(x)·sin
    with the same roundings in 16-bit (each product, then the sum), minus its two concatenations
    and the negated copy.
    """
    h = cos.shape[-1]
    x1, x2 = x[..., :h], x[..., h: 2 * h]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * h:]), -1)


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
        qkv = self.query_key_value(x).view(B, T, self.n_heads, 3, self.head_dim).transpose(1, 2)
        # LayerNorm over the head dim, then rotary; q and k come out contiguous (B, H, T, d).
        q = apply_partial_rotary(self.q_layernorm(qkv[..., 0, :]), cos, sin)
        k = apply_partial_rotary(self.k_layernorm(qkv[..., 1, :]), cos, sin)
        v = qkv[..., 2, :]
        if cache is not None:  # cache holds post-LayerNorm, post-rotary keys
            k, v = cache.update(layer, slots, k, v)
        # SDPA as the reference calls it (scale 1/sqrt(d)); mask None: causal over the new tokens
        # (a prefill) or, for one new token, everything cached, as the reference's unmasked decode.
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

    def requires_grad_(self, requires_grad: bool = True):
        """As nn.Module's; making the model trainable first restores packed CPU weights (kernels.py)."""
        if requires_grad:
            from fuyu.model.kernels import unpack_linears

            unpack_linears(self)
        return super().requires_grad_(requires_grad)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .float() and friends: packed CPU weights are restored first (exactly),
        since a packed weight is bound to its CPU dtype and layout."""
        from fuyu.model.kernels import unpack_linears

        unpack_linears(self)
        return super()._apply(fn, recurse)

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
        valid = valid.bool()
        if cache is None or cache.pos == 0:  # only these T tokens: plain causal unless there is padding
            mask = None if bool(valid.all()) else attention_mask(valid, torch.arange(T, device=x.device))
            if cache is not None:
                cache.mark_valid(cache.next_slots(T), valid)
        else:  # earlier tokens are cached: attend over them and causally over the new ones
            slots = cache.next_slots(T)
            n = cache.pos + T
            seen = cache.mark_valid(slots, valid)[:, :n]
            mask = None if T == 1 and bool(seen.all()) else attention_mask(seen, slots)
        h = self.layers_forward(x, positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        return h

    def layers_forward(self, x, positions, mask, cache=None, slots=None):
        """The decoder stack on embeddings x (B, T, D); mask None means plain causal attention
        over the new tokens (T > 1) or attention to everything cached (T == 1).

        slots (T,): write the cache through these indices and attend over its whole buffer (the
        fixed shapes of a compiled decode step); None: attend over the slots written so far.
        """
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
        from fuyu.model.generate import generate

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
