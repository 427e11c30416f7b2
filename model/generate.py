"""Generation over token ids: one prefill with the image patches, then one-token decode steps."""

from __future__ import annotations

import functools

import torch

from fuyu.model.cache import KVCache
from fuyu.model.fuyu import Fuyu, position_ids
from fuyu.model.kernels import exact_argmax, head_logits, wants_fast_head


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy when temperature is 0, else top-k/top-p sampling."""
    if temperature <= 0:  # (float32: torch's bf16 argmax is ~4× slower over 262,144 logits; same ids)
        return logits.float().argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def new_cache(model: Fuyu, batch: int, max_len: int, static: bool = False) -> KVCache:
    cfg, w = model.config, model.embed_tokens.weight
    return KVCache(cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim,
                   w.device, w.dtype, static=static)


def decode_step(model: Fuyu, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """Last hidden state (B, D) for one new token per row (B, 1) written at cache slot `slot` (1,),
    attending over the whole buffer of a static cache, unwritten and pad slots masked.

    Every shape is fixed for a given cache, so this compiles once (torch.compile) and replays.
    Eager decoding goes through Fuyu.hidden instead, which attends over the written slots only.
    """
    x = model.embed_tokens(tokens)
    valid = cache.mark_valid(slot, torch.ones_like(tokens, dtype=torch.bool))
    return model.layers_forward(x, positions, valid[:, None, None, :], cache, slot)[:, -1]


@functools.cache
def compiled_decode_step():
    """decode_step compiled once per process; CUDA graphs on GPU ("reduce-overhead")."""
    mode = "reduce-overhead" if torch.cuda.is_available() else None
    return torch.compile(decode_step, mode=mode, dynamic=False)


def cache_length(n_tokens: int, multiple: int = 256) -> int:
    """Cache sizes are rounded up so compiled steps see few distinct shapes across batches."""
    return -(-n_tokens // multiple) * multiple


@torch.inference_mode()
def generate(model: Fuyu, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             patches: torch.Tensor | None, max_new_tokens: int, *, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, compile: bool = False,
             fast_head: bool | None = None) -> torch.Tensor:
    """New ids (B, N) for a left-padded batch; stops when every row has emitted EOS or after
    max_new_tokens. Finished rows are padded with EOS, as the reference's generate does.

    compile: run decode steps through torch.compile (fixed shapes, CUDA graphs on GPU).
    fast_head: compiled GEMV for the LM head; None = where it pays (large 16-bit head on CPU).
    """
    eos = model.config.eos_token_id if eos_id is None else eos_id
    B, T = input_ids.shape
    if max_new_tokens <= 0:
        return input_ids.new_zeros(B, 0)
    head = model.lm_head
    # The compiled GEMV needs a plain 16-bit weight; a quantized or offloaded head runs as itself.
    fast = type(head) is torch.nn.Linear and (wants_fast_head(head.weight) if fast_head is None else fast_head)
    cache = new_cache(model, B, cache_length(T + max_new_tokens) if compile else T + max_new_tokens, static=compile)
    positions = position_ids(attention_mask)
    # Prefill: only the last position's logits are ever needed (the vocabulary is 262,144 wide).
    h = model.hidden(input_ids, positions, attention_mask.bool(), cache, patches)

    def next_ids(h: torch.Tensor) -> torch.Tensor:
        logits = head_logits(h, head, fast)
        if fast and temperature <= 0:  # the fast head sums in another order: greedy ids stay exact
            return exact_argmax(h, head.weight, logits)
        return sample(logits, temperature, top_k, top_p, generator)

    nxt = next_ids(h[:, -1])
    pos = positions[:, -1:]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for i in range(max_new_tokens):
        nxt = nxt.masked_fill(done, eos)
        out.append(nxt)
        done |= nxt == eos
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        pos = pos + 1
        if compile:  # fixed shapes: the slot goes in as a tensor, the whole buffer is attended over
            slot = torch.tensor([cache.pos], device=input_ids.device)
            h = compiled_decode_step()(model, nxt[:, None], pos, slot, cache)
            cache.advance(1)
        else:  # the reference's decode: the slots written so far, masked only where prompts were padded
            h = model.hidden(nxt[:, None], pos, None, cache)[:, -1]
        nxt = next_ids(h)
    return torch.stack(out, dim=1)
