"""The KV cache: preallocated keys/values plus all the bookkeeping of where tokens go and what they see.

Slots fill left to right, all rows at once. A row's left padding (or the padding between a shared
image prefix and its continuation) is a slot that is never valid, so it is never attended to. The
rotary position of a token is kept apart from its slot: positions count only a row's real tokens
(padding takes no position, as in the reference), slots count everything written.

Two phases:
- prefill (`append`): T tokens at host-known slots; attention reads the slots written so far;
- decode (`step`, after `start_decoding`): one token per row at the device-side slot `slot`;
  attention reads the whole buffer, unwritten slots masked. Every shape is fixed and nothing is
  read back to the host, so a step compiles once and replays (CUDA graphs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad-aware rotary positions (B, T): a row's first real token is 0; pads get 1 (as the reference)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class Window(NamedTuple):
    """Where one forward's T new tokens go and what they attend to."""

    slots: torch.Tensor  # (T,) cache slots of the new tokens
    span: int  # attention reads slots [0, span)
    mask: torch.Tensor | None  # (B, 1, T, span) bool; None: plain causal over the T new tokens


class LayerKV(NamedTuple):
    """One layer's view of the cache during a forward."""

    k: torch.Tensor  # (B, H, S, D)
    v: torch.Tensor
    window: Window

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at the window's slots; return keys and values (B, H, span, D)."""
        slots, span = self.window.slots, self.window.span
        self.k[:, :, slots] = k  # index_put_: reinplaced by inductor, no copy of the buffer
        self.v[:, :, slots] = v
        return self.k[:, :, :span], self.v[:, :, :span]


class KVCache:
    """Keys and values of every layer (B, H, S, D each), post-LayerNorm and post-rotary, and:

    valid (B, S): which slots hold real tokens; next_position (B,): each row's next rotary
    position; slot (1,): the next free slot (device tensor); length: slots filled by prefill (host);
    cos/sin (S, R/2): rotary tables, built once (positions never exceed slots).
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 rotary_dim: int, rope_theta: float, device, dtype: torch.dtype):
        shape = (batch, n_heads, max_len, head_dim)
        # zeros, not empty: decode reads unwritten slots (masked), and 0·NaN would still be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch, device=device, dtype=torch.long)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.length = 0
        self._pending = 0  # slots reserved by append, counted into length by advance
        self.padded = False  # some slot before `length` is invalid (known once, at prefill)
        self.decoding = False
        self.rope = (rotary_dim, rope_theta)
        self.cos, self.sin = rotary_tables(max_len, rotary_dim, rope_theta, device)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> KVCache:
        cfg, w = model.config, model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim,
                   cfg.rotary_dim, cfg.rope_theta, w.device, w.dtype)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    # --- bookkeeping, before a forward -------------------------------------------------------

    def append(self, valid: torch.Tensor) -> torch.Tensor:
        """Reserve the next T slots for a prefill chunk whose real tokens are `valid` (B, T);
        returns their rotary positions (B, T), continuing each row's count."""
        if self.decoding:
            raise RuntimeError("this cache is decoding; prefill into a new cache")
        B, T = valid.shape
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {start + T} requested")
        valid = valid.to(self.valid.device).bool()
        self.valid[:, start:start + T] = valid
        self.padded = self.padded or not bool(valid.all())
        positions = (self.next_position[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        self.next_position += valid.sum(-1)
        self._pending = T
        return positions

    def start_decoding(self) -> None:
        """From now on tokens come one per row through `step`, with fixed shapes."""
        self.slot.fill_(self.length)
        self.decoding = True

    def step(self) -> torch.Tensor:
        """Reserve slot `slot` for one new token per row; returns their positions (B, 1). Device-only."""
        self.valid.index_fill_(1, self.slot, True)
        return self.next_position[:, None].clone()

    def window(self, T: int) -> Window:
        """Slots of the T tokens just reserved, how far attention reads, and the mask (the one
        mask rule): a query sees slot j iff j ≤ its own slot and j is valid, and always itself,
        so that pad queries stay finite (their outputs are never used)."""
        if self.decoding:
            slots, span = self.slot, self.max_len
        else:
            start = self.length
            slots, span = torch.arange(start, start + T, device=self.valid.device), start + T
            if start == 0 and not self.padded:
                return Window(slots, span, None)
        k_slot = torch.arange(span, device=slots.device)
        q_slot = slots[:, None]  # (T, 1)
        mask = ((k_slot <= q_slot) & self.valid[:, None, None, :span]) | (k_slot == q_slot)
        return Window(slots, span, mask)

    def layer(self, i: int, window: Window) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], window)

    def rotary(self, positions: torch.Tensor):
        """cos, sin (B, 1, T, R/2) for positions (B, T), from the tables."""
        return self.cos[positions][:, None], self.sin[positions][:, None]

    # --- after a forward -----------------------------------------------------------------------

    def advance(self) -> None:
        """The reserved tokens are written: move past them."""
        if self.decoding:
            self.slot.add_(1)
            self.next_position.add_(1)
        else:
            self.length += self._pending
            self._pending = 0

    # --- several prompt lengths in one cache ----------------------------------------------------

    def rows(self, start: int, stop: int, offset: int) -> KVCache:
        """A cache over rows [start, stop) whose slot 0 is this cache's slot `offset`, sharing its
        storage: prefilling a batch of prompts of length L − offset into it leaves them right-aligned
        at slot L, as if left-padded among longer prompts, without computing the padding.

        All parts are prefilled before this cache takes over (`joined`); they never decode."""
        if self.decoding or self.length:
            raise RuntimeError("parts are taken from an empty cache")
        part = object.__new__(KVCache)
        part.k = [t[start:stop, :, offset:] for t in self.k]
        part.v = [t[start:stop, :, offset:] for t in self.v]
        part.valid = self.valid[start:stop, offset:]
        part.next_position = self.next_position[start:stop]
        part.slot = torch.zeros(1, device=self.slot.device, dtype=torch.long)
        part.length, part._pending, part.padded, part.decoding = 0, 0, False, False
        part.rope, part.cos, part.sin = self.rope, self.cos, self.sin
        return part

    def joined(self, length: int) -> None:
        """Take over the parts (from `rows`) once prefilled: every row is written up to `length`."""
        self.length = length
        self.padded = not bool(self.valid[:, :length].all())  # once, at prefill

    # --- shared prefixes -----------------------------------------------------------------------

    def extend(self, rows: torch.Tensor, room: int) -> KVCache:
        """A new cache whose row i starts as a copy of this (prefilled) cache's row rows[i], with
        `room` more slots after it."""
        if self.decoding:
            raise RuntimeError("only a prefilled (not decoding) cache can be extended")
        rows = rows.to(self.valid.device)
        P, B = self.length, rows.shape[0]
        k0 = self.k[0]
        new = KVCache(len(self.k), B, k0.shape[1], P + room, k0.shape[3], *self.rope, k0.device, k0.dtype)
        for mine, theirs in ((new.k, self.k), (new.v, self.v)):
            for a, b in zip(mine, theirs):
                a[:, :, :P] = b[rows, :, :P]
        new.valid[:, :P] = self.valid[rows, :P]
        new.next_position.copy_(self.next_position[rows])
        new.length, new.padded = P, self.padded
        return new

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_per_token(n_layers: int, hidden: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * hidden * torch.empty(0, dtype=dtype).element_size()


def rotary_tables(n: int, rotary_dim: int, base: float, device):
    """cos, sin (n, R/2) float32 of positions 0..n-1, computed as the reference does.

    Dims i and i + R/2 of a head share frequency i (rotate-half pairing), so half a table is enough.
    """
    exponent = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponent)  # (R/2,)
    theta = torch.arange(n, device=device, dtype=torch.int64).float()[:, None] * inv_freq
    return theta.cos(), theta.sin()
