"""Will the run fit? The CLI's memory plan, on fuyu.model.memory's arithmetic.

Before a weight is read: the weights (in the dtype and quantization asked for), one row's KV cache
at the largest prompt Fuyu can see (a 1920×1080 image) plus --max-new-tokens, that prefill's
activations and the process itself, against the memory this process may use (MemAvailable capped
by its cgroup; a GPU's free memory). A run that cannot fit stops with one line naming what would
fit (exit 2), rather than being killed by the OOM killer half-way through loading.

After loading: every batch is made to fit what is left (`BatchBudget`): a window of full-HD
screenshots at --batch-size 8 runs as the batches that fit; an item that fits in no batch is a
failed record naming the memory it needs, and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fuyu.errors import FuyuError

# Kept free after loading for what a batch needs besides its cache and activations: its
# preprocessed patches (25 MB a full-HD image in float32), the records, allocator slack.
BATCH_MARGIN = 256 << 20


def _arithmetic():
    """fuyu.model.memory, imported when needed (it brings torch: `fuyu --help` must not pay)."""
    from fuyu.model import memory

    return memory


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def weight_bytes(ckpt: Path, dtype: str, quantization: str | None = None) -> int:
    return _arithmetic().weight_bytes(ckpt, dtype, quantization)


def available_memory() -> int | None:
    """Host memory this process may still take (fuyu.model.memory.available); tests patch this."""
    return _arithmetic().available()


def room_on(device: str) -> int | None:
    """What the model may still take on `device`: a GPU's free memory, else the host's."""
    if device.startswith("cuda"):
        return _arithmetic().device_available(device)
    return available_memory()


def check_fit(ckpt: Path, name: str, cfg, dtype: str, quantization: str | None, max_new_tokens: int,
              device: str) -> None:
    """FuyuError (exit 2) when even one row of the largest prompt cannot fit, naming the memory
    needed and the choices that would fit; nothing when it fits or the room is unknown."""
    room = room_on(device)
    if room is None:
        return
    arithmetic = _arithmetic()
    tokens = arithmetic.worst_tokens(max_new_tokens)

    def need(dt: str, q: str | None) -> arithmetic.Need:
        return arithmetic.need(cfg, weight_bytes(ckpt, dt, q), 1, tokens, dt)

    try:
        asked = need(dtype, quantization)
    except (OSError, ValueError, KeyError, TypeError):
        return  # headers the loader will explain better
    if arithmetic.fits(asked.total, room):
        return
    wide = dtype == "float32"
    options = [("--dtype bfloat16", "bfloat16", quantization)] if wide else []
    if quantization is None:
        dt, flag = ("bfloat16", "--dtype bfloat16 ") if wide else (dtype, "")
        options += [(f"{flag}--quantize int8", dt, "int8"), (f"{flag}--quantize int4", dt, "int4")]
    elif quantization in ("int8", "8bit", "llm_int8"):
        options.append(("--quantize int4", dtype, "int4"))
    fitting = []
    for flag, dt, q in options:
        total = need(dt, q).total
        if arithmetic.fits(total, room):
            fitting.append(f"{flag} ({gb(total)})")
    where = "GPU memory" if device.startswith("cuda") else "memory"
    quant = f" with --quantize {quantization}" if quantization else ""
    raise FuyuError(f"{name} needs {asked.describe()} in {dtype}{quant} for one image of up to "
                    f"1920×1080 and {max_new_tokens} new tokens, but {gb(room)} of {where} is available",
                    ("use " + " or ".join(fitting) + ", or " if fitting else "use ")
                    + "--device-map auto --offload-folder DIR (what does not fit is read from disk)")


@dataclass
class BatchBudget:
    """Whether a batch's KV cache and activations fit in what was left after loading."""

    cfg: object
    dtype: str
    room: int | None  # bytes; None: unknown, every batch fits
    max_new_tokens: int

    @classmethod
    def after_load(cls, model, device: str, max_new_tokens: int) -> BatchBudget:
        room = room_on(device)
        if room is not None:
            room = max(0, int(room * (1 - _arithmetic().SAFETY)) - BATCH_MARGIN)
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        return cls(model.config, dtype, room, max_new_tokens)

    def tokens(self, size: tuple[int, int] | None) -> int:
        """Slots a row of an image of `size` (width, height; None: unknown) takes."""
        if size is None or size == (0, 0):
            return _arithmetic().worst_tokens(self.max_new_tokens)
        from fuyu.preprocess.patches import image_tokens

        return image_tokens(*size) + _arithmetic().PROMPT_TOKENS + self.max_new_tokens

    def bytes(self, rows: int, tokens: int) -> int:
        arithmetic = _arithmetic()
        return (arithmetic.kv_bytes(self.cfg, rows, tokens, self.dtype)
                + arithmetic.activation_bytes(self.cfg, rows, tokens, self.dtype))

    def fits(self, rows: int, tokens: int) -> bool:
        return self.room is None or self.bytes(rows, tokens) <= self.room

    def too_big(self, tokens: int) -> str:
        """The failed record's message for an item that fits in no batch."""
        return (f"needs {gb(self.bytes(1, tokens))} of KV cache and activations for its "
                f"{tokens} tokens, but {gb(self.room or 0)} is left after loading the model; use "
                "--quantize int8 or int4, a smaller --max-new-tokens, or free memory")
