"""FuyuConfig: the architecture numbers, read from a checkpoint's config.json (flat or nested form)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from fuyu.model.errors import CheckpointError

# Keys that only matter to other libraries (training, hub bookkeeping, generation defaults).
_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "hidden_dropout", "attention_dropout", "image_size", "_name_or_path",
    "_commit_hash", "_attn_implementation_autoset", "tie_word_embeddings", "pad_token_id",
    "is_encoder_decoder", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "cross_attention_hidden_size", "add_cross_attention", "tf_legacy_loss", "torchscript",
    "pruned_heads", "is_decoder", "use_bfloat16", "_vocab_size", "text_config", "vision_config",
    "rope_scaling", "rope_parameters", "quantization_config",
}
# Persimmon's own defaults: the hub config's `text_config: {"model_type": "persimmon"}` builds the
# language model from these, not from the top-level numbers (as the reference's
# FuyuConfig does).
_PERSIMMON_DEFAULTS = dict(
    vocab_size=262144, hidden_size=4096, intermediate_size=16384, num_hidden_layers=36,
    num_attention_heads=64, hidden_act="relu2", max_position_embeddings=16384,
    layer_norm_eps=1e-5, rope_theta=25000.0, qk_layernorm=True, partial_rotary_factor=0.5,
)
_TEXT_KEYS = set(_PERSIMMON_DEFAULTS)


@dataclass(frozen=True)
class FuyuConfig:
    """Fuyu-8B by default. Runtime limits (batch size, device) do not belong here."""

    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    max_position_embeddings: int = 16384
    layer_norm_eps: float = 1e-5
    rope_theta: float = 25000.0
    partial_rotary_factor: float = 0.5
    patch_size: int = 30
    num_channels: int = 3
    bos_token_id: int = 1
    eos_token_id: int = 71013  # |ENDOFTEXT|: the hub config's generation EOS
    image_token_id: int = 71011  # |SPEAKER|: absent from the hub config, class default
    # Set by `fuyu convert --quantize`: {"method": "int8"|"nf4"|..., ...}; None for plain weights.
    quantization: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def tiny(cls, **overrides) -> FuyuConfig:
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=4096)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_json(cls, d: dict[str, Any], source: str = "config.json") -> FuyuConfig:
        """Read a transformers FuyuConfig dict: nested `text_config` (hub) or flat form."""
        text = d.get("text_config")
        if text:  # nested: the language model is Persimmon defaults + text_config only
            lm = {**_PERSIMMON_DEFAULTS, **{k: v for k, v in text.items() if k in _TEXT_KEYS}}
            _check_supported(text, source)
            _read_rope_parameters(text, lm)
        else:  # flat: the top level describes the language model
            lm = {**_PERSIMMON_DEFAULTS, **{k: v for k, v in d.items() if k in _TEXT_KEYS}}
            _read_rope_parameters(d, lm)
        _check_supported(d, source)
        if d.get("hidden_size", lm["hidden_size"]) != lm["hidden_size"]:
            # The reference sizes vision_embed_tokens by the top-level hidden_size: both must agree.
            raise CheckpointError(
                f"{source}: hidden_size {d['hidden_size']} differs from text_config's "
                f"{lm['hidden_size']}; the checkpoint is inconsistent"
            )
        top = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: lm[k] for k in top if k in lm}
        for k in ("patch_size", "num_channels", "bos_token_id", "eos_token_id", "image_token_id",
                  "quantization"):
            if d.get(k) is not None:
                kwargs[k] = d[k]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        unknown = sorted(set(d) - top - _TEXT_KEYS - _BOOKKEEPING)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**kwargs)

    def to_hf_json(self) -> dict[str, Any]:
        """The flat transformers form; the reference library reads it back to the same model."""
        d = {"architectures": ["FuyuForCausalLM"], "model_type": "fuyu", "hidden_act": "relu2",
             "qk_layernorm": True, "rope_scaling": None, "tie_word_embeddings": False}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                d[f.name] = value
        return d


def _read_rope_parameters(d: dict, lm: dict) -> None:
    rope = d.get("rope_parameters")  # transformers 5.x spelling
    if rope:
        lm["rope_theta"] = rope.get("rope_theta", lm["rope_theta"])
        lm["partial_rotary_factor"] = rope.get("partial_rotary_factor", lm["partial_rotary_factor"])


def _check_supported(d: dict, source: str) -> None:
    if d.get("hidden_act", "relu2") != "relu2":
        raise CheckpointError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Fuyu uses relu2)")
    if d.get("qk_layernorm", True) is not True:
        raise CheckpointError(f"{source}: qk_layernorm=false is not supported (Fuyu uses q/k LayerNorm)")
    rope = d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("rope_type", "default")
    if rope not in (None, "default"):
        raise CheckpointError(f"{source}: rope scaling {rope!r} is not supported")
