"""A preallocated key/value cache, passed into the model's forward as an argument."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values (L, B, H, S, D) plus which slots hold real tokens (B, S).

    Slots fill left to right for all rows at once (`pos` is shared); left padding is expressed
    through `valid`, so pad slots are never attended to.

    Two ways to read it back (see update):
    - by default attention reads the slots written so far, exactly the keys the reference's growing
      cache holds, so its kernels see the same shapes and round the same way;
    - compiled decode steps write through an index tensor and read the whole buffer, so a step has
      the same shapes at every position (what torch.compile and CUDA graphs need); unwritten slots
      are invalid, hence masked. Only such a `static` cache is zero-filled: elsewhere nothing is
      read before it is written.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, static: bool = False):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        alloc = torch.zeros if static else torch.empty
        self.k = alloc(shape, device=device, dtype=dtype)
        self.v = alloc(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.static = static
        self.pos = 0  # slots filled so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def next_slots(self, T: int) -> torch.Tensor:
        """Indices (T,) of the next T free slots."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.pos + T} requested")
        return torch.arange(self.pos, self.pos + T, device=self.valid.device)

    def mark_valid(self, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Record the validity (B, T) of the tokens written at slots (T,); returns all slots' (B, S)."""
        self.valid.index_copy_(1, slots, valid)
        return self.valid

    def update(self, layer: int, slots: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at the next T slots; return the keys and values to attend over.

        slots None: written by slicing at `pos`; returns those written so far (B, H, pos + T, D).
        slots (T,): written through the index tensor and the whole buffer returned, so that a
        compiled step's graph depends on neither `pos` nor the sequence length.
        """
        if slots is not None:
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    @staticmethod
    def bytes_per_token(n_layers: int, hidden: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * hidden * torch.empty(0, dtype=dtype).element_size()
