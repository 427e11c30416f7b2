"""One prepared sample, and the left-padded batch the model consumes, padded with id 0 on the left as the reference does."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from fuyu.preprocess.errors import PreprocessError
from fuyu.preprocess.patches import PATCH_DIM


@dataclass(frozen=True)
class Sample:
    """One image + prompt, ready to batch: image rows, then the prompt (fuyu.preprocess.prompt)."""

    ids: list[int]
    patches: torch.Tensor  # (N, 2700) float32; N = 0 for a text-only sample
    size: tuple[int, int] | None  # original (height, width) after EXIF orientation; None if no image
    scale: float | None  # float32-rounded resized_h / h, the factor used for prompt coordinates
    name: str  # the image's path or description, for messages
    prefix_len: int = 0  # ids[:prefix_len] are the image's rows: the prefix its prompts can share


@dataclass(frozen=True)
class FuyuBatch:
    """Model inputs for B samples; the k-th |SPEAKER| id (row-major over the batch) takes patch k."""

    input_ids: torch.Tensor  # (B, T) int64, left-padded with 0
    attention_mask: torch.Tensor  # (B, T) int64, 0 on padding
    image_patches: torch.Tensor  # (P, 2700) float32, every sample's patches in sample order
    image_sizes: list[tuple[int, int] | None]
    scale_factors: list[float | None]
    names: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> FuyuBatch:
        """Tensors moved to `device`; patches stay float32 (the model casts them)."""
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       image_patches=self.image_patches.to(device))


def collate(samples: Sequence[Sample], pad_id: int = 0) -> FuyuBatch:
    """Left-pad ids to the longest sample and concatenate patches in sample order."""
    if not samples:
        raise PreprocessError("no samples to batch")
    T = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        input_ids[b, T - len(s.ids):] = torch.tensor(s.ids, dtype=torch.long)
        attention_mask[b, T - len(s.ids):] = 1
    patches = [s.patches for s in samples if s.patches.shape[0]]
    if len(patches) == 1:
        image_patches = patches[0]  # no copy for the common single-image batch
    elif patches:
        image_patches = torch.cat(patches)
    else:
        image_patches = torch.zeros((0, PATCH_DIM), dtype=torch.float32)
    return FuyuBatch(input_ids, attention_mask, image_patches, [s.size for s in samples],
                     [s.scale for s in samples], [s.name for s in samples])
