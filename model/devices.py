"""Where each module of a model lives: one device, an explicit map, or accelerate's "auto" map.

A device map sends module names (our names: "embed_tokens", "layers.3", "lm_head"; ranges
"layers.0-17" expand) to a GPU index, "cpu" or "disk". With a GPU in the map, "cpu" modules are
offloaded (kept in RAM, run on the main GPU); "disk" modules are read from disk on every forward.
The loader places each tensor as it streams in; `dispatch` then lets accelerate's hooks move
activations and fetch offloaded weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

# Read directly by Fuyu.embed / generate() (weight.device, or F.linear on lm_head.weight), not
# only through their forward, so they must be resident on the main device, never offloaded.
PINNED = ("embed_tokens", "vision_embed_tokens", "lm_head")
_RANGE = re.compile(r"(?P<prefix>.*?)(?P<a>\d+)-(?P<b>\d+)")


def device_value(dev: int | str | torch.device) -> int | str:
    """accelerate's spelling of a device: GPU index, "cpu", "disk" (or e.g. "mps")."""
    if isinstance(dev, int):
        return dev
    if str(dev) == "disk":
        return "disk"
    d = torch.device(dev)
    return (d.index or 0) if d.type == "cuda" else d.type


def as_torch(value: int | str) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


@dataclass(frozen=True)
class Placement:
    device_map: dict[str, int | str] | None  # None: the whole model on `main`
    main: torch.device

    def device_map_value(self, name: str) -> int | str:
        """The map's value for module `name`: its most specific covering key."""
        best = max((k for k in self.device_map if _covers(k, name)), key=len, default=None)
        if best is None:
            raise ValueError(f"device_map does not place {name!r}")
        return self.device_map[best]

    def target(self, name: str) -> torch.device | str:
        """Where the tensors of module `name` are stored: a torch.device or "disk"."""
        if self.device_map is None:
            return self.main
        value = self.device_map_value(name)
        return "disk" if value == "disk" else as_torch(value)

    def offloaded(self, name: str) -> bool:
        target = self.target(name)
        return target == "disk" or (target.type == "cpu" and self.main.type != "cpu")

    def execution_device(self, name: str) -> torch.device:
        return self.main if self.offloaded(name) else self.target(name)


def _covers(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def units(model: nn.Module) -> list[str]:
    """What a device map places: top-level modules, with each decoder block on its own."""
    return [f"{name}.{i}" if isinstance(child, nn.ModuleList) else name
            for name, child in model.named_children()
            for i in (range(len(child)) if isinstance(child, nn.ModuleList) else [None])]


def expand_device_map(device_map: Mapping, model: nn.Module) -> dict[str, int | str]:
    """{unit: device} from a user map: values normalised, "layers.0-17" ranges expanded, "" or
    "layers" covering their members, the most specific key winning; whole blocks only."""
    modules, all_units = dict(model.named_modules()), units(model)
    given: dict[str, int | str] = {}
    for key, dev in device_map.items():
        m = _RANGE.fullmatch(key)
        for name in [f"{m['prefix']}{i}" for i in range(int(m["a"]), int(m["b"]) + 1)] if m else [key]:
            if name not in modules:
                raise ValueError(f"device_map: no module named {name!r} (use names like "
                                 "'embed_tokens', 'layers.0-17', 'final_layernorm', 'lm_head')")
            if not any(_covers(name, unit) for unit in all_units):
                raise ValueError(f"device_map: {name!r} is part of a block; place whole blocks")
            given[name] = device_value(dev)
    # accelerate wants disjoint keys; resolve each unit to its most specific entry
    return {unit: Placement(given, torch.device("cpu")).device_map_value(unit) for unit in all_units}


def auto_device_map(model: nn.Module, max_memory: Mapping | None, dtype: torch.dtype,
                    quantized_bits: Mapping[str, int]) -> dict[str, int | str]:
    """accelerate's greedy map (GPUs in order, then CPU, then disk) over whole decoder blocks, with
    the PINNED modules reserved on the first device; quantized weights count at packed size."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype, compute_module_sizes, get_max_memory

    special = {f"{name}.weight": torch.int8 if bits == 8 else CustomDtype.INT4
               for name, bits in quantized_bits.items()}
    memory = get_max_memory(None if max_memory is None else
                            {k if k == "disk" else device_value(k): v for k, v in max_memory.items()})
    main = next(k for k in memory if k != "disk")
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    memory[main] -= sum(sizes[name] for name in PINNED)
    if memory[main] < 0:
        raise ValueError(f"max_memory: {main} cannot hold the embeddings and LM head "
                         f"({sum(sizes[n] for n in PINNED) / 2**20:.0f} MiB)")
    rest = nn.Module()  # the model without the pinned modules, same child names
    for name, child in model.named_children():
        if name not in PINNED:
            rest.add_module(name, child)
    dm = infer_auto_device_map(rest, max_memory=memory, no_split_module_classes=["Block"],
                               dtype=dtype, special_dtypes=special)
    if "" in dm:  # everything fitted on one device
        dm = {name: dm[""] for name, _ in rest.named_children()}
    return {**dict.fromkeys(PINNED, main), **dm}


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """CLI spelling → device_map: "auto", or "layers.0-17=0,layers.18-35=1,lm_head=cpu,..."."""
    if text.strip() == "auto":
        return "auto"
    return {k.strip(): _parse_device(v) for k, v in _pairs(text, "--device-map")}


def parse_max_memory(text: str) -> dict[int | str, str]:
    """CLI spelling → max_memory: "0=20GiB,cpu=30GiB" (GPU index or cuda:N, cpu, disk)."""
    return {_parse_device(k): v.strip() for k, v in _pairs(text, "--max-memory")}


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    items = [item.partition("=") for item in text.split(",") if item.strip()]
    if not items or any(not eq or not v.strip() for _, eq, v in items):
        raise ValueError(f"{what} {text!r}: use name=device pairs separated by commas")
    return [(k, v) for k, _, v in items]


def _parse_device(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() else device_value(text)


def plan_placement(model: nn.Module, device: str | torch.device, device_map, max_memory,
                   dtype: torch.dtype, quantized_bits: Mapping[str, int] = {}) -> Placement:
    """Placement for `device`, or for `device_map` ("auto", or {module: device}) when given."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory only applies with device_map='auto'")
        return Placement(None, torch.device(device))
    if device_map == "auto":
        dm = auto_device_map(model, max_memory, dtype, quantized_bits)
    elif isinstance(device_map, Mapping):
        dm = expand_device_map(device_map, model)
    else:
        raise ValueError(f"device_map {device_map!r}: use 'auto' or a dict of module → device")
    gpus = sorted({v for v in dm.values() if v not in ("cpu", "disk")}, key=str)
    placement = Placement(dm, as_torch(gpus[0]) if gpus else torch.device("cpu"))
    for name in PINNED:
        if placement.offloaded(name):
            raise ValueError(f"device_map puts {name} on {placement.target(name)}; it must stay on the "
                             f"main device {placement.main} (give that device more max_memory)")
    return placement


def dispatch(model: nn.Module, placement: Placement, offload_folder, offload_index: dict) -> nn.Module:
    """Attach accelerate's hooks when the model spans devices or reads weights from disk."""
    dm = placement.device_map
    if dm is None or (len(set(dm.values())) == 1 and "disk" not in dm.values()):
        return model
    from accelerate import dispatch_model

    return dispatch_model(model, dm, main_device=str(placement.main),
                          offload_dir=None if offload_folder is None else str(offload_folder),
                          offload_index=offload_index or None)
