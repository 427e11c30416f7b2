"""The batch-level API, plain functions over token ids: prefill, decode steps, logits, loss, generate.

`batch` is a fuyu.preprocess.FuyuBatch or anything with `input_ids` (B, T) left-padded,
`attention_mask` (B, T) and `image_patches` (P, 2700) (attributes or dict keys), or a list of
them; each public function resolves it once into `Inputs` on the model's device. A decode step
lives in one place, `decode_step`; generate runs it eagerly or compiled, the same function. It is
the one place that hands a step to the model's backend (model.backend: the CPU backend of a model
loaded on the CPU, model/backend.py) or runs the plain step (model/fuyu.py's torch ops).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuyu.model.cache import KVCache
from fuyu.model.constrain import Constraints, Grammar
from fuyu.model.fuyu import Fuyu


class Inputs(NamedTuple):
    """One batch's tensors, on the model's device."""

    ids: torch.Tensor  # (B, T) int64, left-padded
    mask: torch.Tensor  # (B, T), 0 on padding
    patches: torch.Tensor | None  # (P, 2700): the k-th |SPEAKER| id (row-major) takes patch k


def batch_tensors(batch, device) -> Inputs:
    """Inputs of a batch (FuyuBatch, dict or anything with its attributes), on `device`."""
    get = batch.get if isinstance(batch, dict) else lambda k: getattr(batch, k, None)
    ids = get("input_ids").to(device)
    mask = get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    patches = get("image_patches")
    if isinstance(patches, (list, tuple)):  # the reference processor's per-sample [1, N, 2700] list
        patches = torch.cat([p.reshape(-1, p.shape[-1]) for p in patches]) if patches else None
    return Inputs(ids, mask, None if patches is None else patches.to(device))


def _resolve(model: Fuyu, batch) -> Inputs | list[Inputs]:
    """`batch` (one, or a list or tuple of them) as Inputs on the model's device: done once, here."""
    device = _device(model)
    if isinstance(batch, (list, tuple)):
        return [batch_tensors(b, device) for b in batch]
    return batch_tensors(batch, device)


def _device(model: Fuyu) -> torch.device:
    return model.embed_tokens.weight.device


def prefill(model: Fuyu, batch, max_new_tokens: int = 0, *, prefix: KVCache | None = None,
            rows: torch.Tensor | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts; returns a cache with room for max_new_tokens more tokens per row and the
    logits (B, V) at each row's last prompt position.

    batch may be a list of batches (e.g. one per image size): each runs on its own, so no prompt
    is padded to another batch's length, and the cache holds all their rows, in order, for
    decoding together.
    prefix (from encode_prefix): the batch holds continuations only; row i continues prefix row
    rows[i] (default i), with positions following on as if it had been run in one piece.
    """
    return _prefill(model, _resolve(model, batch), max_new_tokens, prefix, rows)


def _prefill(model: Fuyu, inputs: Inputs | list[Inputs], max_new_tokens: int, prefix: KVCache | None,
             rows: torch.Tensor | None) -> tuple[KVCache, torch.Tensor]:
    """prefill on resolved inputs: one batch (continuing `prefix` if given), or a list of them."""
    if isinstance(inputs, list):
        if prefix is not None:
            raise ValueError("prefix= continues one batch, not a list of them")
        return _prefill_parts(model, inputs, max_new_tokens)
    ids, mask, patches = inputs
    B, T = ids.shape
    if prefix is None:
        cache = KVCache.for_model(model, B, T + max_new_tokens)
    else:
        rows = torch.arange(B) if rows is None else rows
        if rows.shape != (B,):
            raise ValueError(f"rows has shape {tuple(rows.shape)}; the batch has {B} rows")
        cache = prefix.extend(rows, T + max_new_tokens)
    positions = cache.append(mask)
    h = forward(model, ids, positions, cache, patches)
    cache.advance()
    cache.start_decoding()
    return cache, model.lm_head(h[:, -1])


def _prefill_parts(model: Fuyu, parts: list[Inputs], max_new_tokens: int) -> tuple[KVCache, torch.Tensor]:
    """prefill of several batches into one cache, each right-aligned at the longest one's end."""
    if not parts:
        raise ValueError("no batches to prefill")
    L = max(ids.shape[1] for ids, _, _ in parts)
    cache = KVCache.for_model(model, sum(ids.shape[0] for ids, _, _ in parts), L + max_new_tokens)
    lasts, row = [], 0
    for ids, mask, patches in parts:
        B, T = ids.shape
        part = cache.rows(row, row + B, L - T)
        h = forward(model, ids, part.append(mask), part, patches)
        lasts.append(model.lm_head(h[:, -1]))
        row += B
    cache.joined(L)
    cache.start_decoding()
    return cache, torch.cat(lasts)


def forward(model: Fuyu, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
            patches: torch.Tensor | None = None) -> torch.Tensor:
    """model(ids, positions, cache, patches) for prompt tokens, with the backend's prefill passes
    (on the CPU: the q/k LayerNorms, rotary and cache write in one C pass; bf16 attention in C)."""
    backend = None if torch.compiler.is_compiling() else model.backend
    return model(ids, positions, cache, patches, prefill=backend)


def decode_step(model: Fuyu, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row, ids (B,); returns the logits (B, V) for the position after it.

    Eagerly, the model's backend runs the step where it serves it (on the CPU: every layer in one
    C call), else the plain step runs, with the backend's decode attention. Under torch.compile
    the plain step alone (its Linears as the kernel plan swapped them): fixed shapes and no host sync, so it
    compiles once.
    """
    backend = None if torch.compiler.is_compiling() else model.backend
    if backend is not None:
        logits = backend.step(model, cache, ids)
        if logits is not None:
            return logits
    positions = cache.step()
    h = model(ids[:, None], positions, cache, attend=None if backend is None else backend.attend)
    cache.advance()
    return model.lm_head(h[:, 0])


def encode_prefix(model: Fuyu, input_ids: torch.Tensor, patches: torch.Tensor | None = None) -> KVCache:
    """Run B same-length, unpadded prefixes input_ids (B, P) (e.g. an image's |SPEAKER|/|NEWLINE|
    rows) once; returns their cache, for prefill(..., prefix=, rows=) to continue from."""
    device = _device(model)
    input_ids = input_ids.to(device)
    cache = KVCache.for_model(model, *input_ids.shape)
    positions = cache.append(torch.ones_like(input_ids, dtype=torch.bool))
    forward(model, input_ids, positions, cache, None if patches is None else patches.to(device))
    cache.advance()
    return cache


def logits(model: Fuyu, batch) -> torch.Tensor:
    """Logits (B, T, V) of a left-padded batch, positions derived from the attention mask."""
    ids, mask, patches = batch_tensors(batch, _device(model))
    cache = KVCache.for_model(model, *ids.shape)
    positions = cache.append(mask)
    h = forward(model, ids, positions, cache, patches)
    return model.lm_head(h)


def loss(model: Fuyu, batch, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy; labels (B, T) aligned with input_ids, -100 ignored."""
    out = logits(model, batch)
    labels = labels.to(out.device)
    return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           argmax=None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy when temperature is 0, else top-k/top-p sampling.
    argmax: a backend's greedy pick, the same ids, None where it does not serve (generate passes
    the CPU backend's one C pass over the logits: ~1 ms -> ~0.1 ms a step at 262,144 bf16 logits)."""
    if temperature <= 0:
        ids = None if argmax is None else argmax(logits)
        return logits.float().argmax(dim=-1) if ids is None else ids
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


def stepper(cache: KVCache, compile: bool = False):
    """The decode step for `cache`, called as step(model, cache, ids): decode_step itself, or
    compiled with fixed shapes, CUDA graphs on GPU ("reduce-overhead"). torch caches compiled code
    per function, so wrapping it again for each generate call costs nothing."""
    if not compile:
        return decode_step
    device = cache.valid.device
    if device.type != "cuda":
        return torch.compile(decode_step, dynamic=False)
    # CUDA graphs replay fixed addresses: the cache never moves while it decodes. No guard on the
    # address, so the next generate's new cache re-records the graph rather than recompiling.
    for t in (*cache.k, *cache.v, cache.valid, cache.next_position, cache.slot):
        torch._dynamo.mark_static_address(t, guard=False)
    graphed = torch.compile(decode_step, mode="reduce-overhead", dynamic=False)

    def step(model, cache, ids):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        return graphed(model, cache, ids)
    return step


def cache_room(prompt_len: int, max_new_tokens: int, multiple: int = 256) -> int:
    """Room after the prompt so that the cache length is a multiple of `multiple`: compiled steps
    then see few distinct shapes across batches."""
    return -(-(prompt_len + max_new_tokens) // multiple) * multiple - prompt_len


@torch.inference_mode()
def generate(model: Fuyu, batch, max_new_tokens: int = 32, *, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, compile: bool = False,
             prefix: KVCache | None = None, rows: torch.Tensor | None = None,
             constraints: list[Grammar | None] | None = None, logprobs: bool = False):
    """New ids (B, N), N ≤ max_new_tokens: stops once every row has emitted EOS; rows that
    finished early are padded with EOS, as the reference's generate does.

    batch: one batch, or a list of batches (e.g. one per image size), each prefilled on its own
    and all decoded together, their rows in order: no prompt pays for another's padding, and
    each decode step reads the weights once for all of them.

    compile: decode steps through torch.compile (CUDA graphs on GPU); same ids as eager in float32.
    prefix, rows: continue shared prefixes (see prefill).
    constraints: per row, a fuyu.model.constrain.Grammar its answer must match, or None (free).
    logprobs: also return (B, N) float32: each chosen id's log-probability under the model's
    distribution (temperature 1), renormalised over the ids its row's grammar allowed — taken
    from the logits each step computes anyway.
    """
    eos = model.config.eos_token_id if eos_id is None else eos_id
    device = _device(model)
    inputs = _resolve(model, batch)
    parts = inputs if isinstance(inputs, list) else [inputs]
    B, T = sum(p.ids.shape[0] for p in parts), max(p.ids.shape[1] for p in parts)
    if max_new_tokens <= 0:
        empty = parts[0].ids.new_zeros(B, 0)
        return (empty, empty.float()) if logprobs else empty
    start = 0 if prefix is None else prefix.length
    room = cache_room(start + T, max_new_tokens) if compile else max_new_tokens
    cache, last = _prefill(model, inputs, room, prefix, rows)
    step = stepper(cache, compile)
    # The stop test reads a flag back from the device: every step on CPU, every 8th on GPU.
    check = 1 if device.type == "cpu" else 8
    argmax = None if model.backend is None else model.backend.argmax
    grammars = None if constraints is None or all(g is None for g in constraints) else Constraints(constraints)
    scores: list[torch.Tensor] = []

    def choose(x: torch.Tensor) -> torch.Tensor:
        return sample(x, temperature, top_k, top_p, generator, argmax)

    def pick(step_logits: torch.Tensor) -> torch.Tensor:  # the one sampling point
        if grammars is None:
            ids = choose(step_logits)
            if logprobs:
                scores.append(token_logprobs(step_logits, ids))
            return ids
        ids, picked = sample_allowed(step_logits, grammars.allowed(step_logits.device), choose)
        scores.append(picked)
        grammars.advance(ids)
        return ids

    nxt = pick(last)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        nxt = nxt.masked_fill(done, eos)
        out.append(nxt)
        done |= nxt == eos
        if i == max_new_tokens - 1 or ((i + 1) % check == 0 and bool(done.all())):
            break
        nxt = pick(step(model, cache, nxt))
    new = torch.stack(out, dim=1)
    finished = (new == eos).int().cummax(dim=1).values.all(0)  # (N,): every row done by step i
    if check > 1 and bool(finished.any()):
        new = new[:, :int(finished.int().argmax()) + 1]
    if not logprobs:
        return new
    return new, torch.stack(scores[:new.shape[1]], dim=1)


def sample_allowed(logits: torch.Tensor, allowed: list[torch.Tensor | None], choose) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B,), their log-probabilities (B,)): row r chosen by `choose` among the ids allowed[r]
    only (None: all), its log-probability renormalised over them. A constrained row reads only its
    allowed logits: masking all 262,144 of every row cost 8.5 ms a step at batch 8 on the mid
    checkpoint; this pick takes 0.5 ms there (1,263 allowed ids a row; both measured)."""
    ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    free = [r for r, a in enumerate(allowed) if a is None]
    if free:
        rows = torch.tensor(free, device=logits.device)
        sub = logits[rows]
        ids[rows] = choose(sub)
        picked[rows] = token_logprobs(sub, ids[rows])
    for r, a in enumerate(allowed):
        if a is not None:
            x = logits[r, a].float()[None]
            k = choose(x)
            ids[r] = a[k[0]]
            picked[r] = token_logprobs(x, k)[0]
    return ids, picked


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[row, ids[row]] in float32, (B,): -inf entries (a grammar's mask) drop out.
    log_softmax, not x[id] - logsumexp(x): torch 2.13's CPU logsumexp took 16 ms over 262,144
    float32 logits on this AMD EPYC, log_softmax 0.3 ms (its exp is vectorised)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None]).squeeze(1)
