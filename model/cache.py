"""A preallocated key/value cache, passed into the model's forward as an argument."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values (L, B, H, S, D) plus which slots hold real tokens (B, S).

    Slots fill left to right for all rows at once (`pos` is shared); left padding is expressed
    through `valid`, so pad slots are never attended to.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.pos = 0  # slots filled so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def append_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' validity (B, T); returns validity of all slots so far (B, pos+T)."""
        T = valid.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.pos + T} requested")
        self.valid[:, self.pos:self.pos + T] = valid
        return self.valid[:, :self.pos + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at the current slots; return all keys/values so far (B, H, pos+T, D)."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, T: int) -> None:
        self.pos += T

    @staticmethod
    def bytes_per_token(n_layers: int, hidden: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * hidden * torch.empty(0, dtype=dtype).element_size()
