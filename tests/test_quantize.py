"""Quantized loading: torch int8/int4 and bitsandbytes 8-bit/4-bit, swapped in from outside."""

import pytest
import torch
from torch import nn

from fuyu.model import CheckpointError, generate, kernels, load_pretrained, logits
from fuyu.model.quantize import (Int4, Int8, Int8Linear, dequantize_int4, quantize_int4,
                            quantize_int8, resolve_scheme, scheme_config)
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import make_checkpoint

VOCAB = 320  # multiple of 32: bitsandbytes could pack lm_head, so keeping it 16-bit is a choice
# Measured on this checkpoint (logits std ≈ 1.2), max |Δ| vs bf16: int8 0.15, 8bit 0.18,
# int4 1.8, nf4 1.5, fp4 2.0; bounds leave room for other seeds and CPUs.
SCHEMES = {"int8": (0.5, 0.08), "8bit": (0.5, 0.08), "int4": (4.0, 0.6), "nf4": (4.0, 0.6),
           "fp4": (4.0, 0.8)}
QUANTIZED_TYPES = {"int8": "Int8Linear", "int4": "Int4Linear", "8bit": "Linear8bitLt",
                   "nf4": "Linear4bit", "fp4": "Linear4bit"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q"), hidden=128, heads=4, layers=2,
                           vocab_size=VOCAB, tokenizer=False, seed=3)


@pytest.fixture(scope="module")
def bf16(ckpt):
    return load_pretrained(ckpt)


@pytest.fixture(scope="module")
def batch():
    return make_batch([(2, 3, 5), (1, 2, 3)], VOCAB, seed=1)


def linear_types(model) -> dict[str, str]:
    """Module type per Linear; a weight served by a CPU kernel counts as its plain module's type."""
    return {name: type(m.plain()).__name__ if isinstance(m, kernels.SWAPPED) else type(m).__name__
            for name, m in model.named_modules()
            if name.split(".")[-1] in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
                                       "lm_head", "vision_embed_tokens")}


@pytest.mark.parametrize("method", list(SCHEMES))
def test_each_scheme_loads_close_to_bf16_and_generates(ckpt, bf16, batch, method):
    model = load_pretrained(ckpt, quantization=method)
    types = linear_types(model)
    assert types.pop("vision_embed_tokens") == "Linear" and types.pop("lm_head") == "Linear"
    assert set(types.values()) == {QUANTIZED_TYPES[method]} and len(types) == 8
    with torch.no_grad():
        want, got = logits(bf16, batch).float(), logits(model, batch).float()
    max_bound, mean_bound = SCHEMES[method]
    assert (got - want).abs().max().item() < max_bound
    assert (got - want).abs().mean().item() < mean_bound
    new = generate(model, batch, max_new_tokens=5, eos_id=-1)
    assert new.shape == (2, 5) and int(new.max()) < VOCAB


def test_int8_greedy_tokens_match_bf16(ckpt, bf16, batch):
    model = load_pretrained(ckpt, quantization="int8")
    want = generate(bf16, batch, max_new_tokens=12, eos_id=-1)
    got = generate(model, batch, max_new_tokens=12, eos_id=-1)
    assert (got == want).float().mean().item() >= 0.75  # measured: all 24 agree


def test_bitsandbytes_4bit_keeps_layers_it_cannot_pack_in_16bit(tmp_path):
    # hidden 96: 96 inputs are not a multiple of 64, so no attention/MLP-in layer can be packed
    ckpt = make_checkpoint(tmp_path, hidden=96, heads=6, intermediate=256, vocab_size=VOCAB, tokenizer=False)
    types = linear_types(load_pretrained(ckpt, quantization="4bit"))
    assert types["layers.0.self_attn.query_key_value"] == "Linear"
    assert types["layers.0.mlp.dense_4h_to_h"] == "Linear4bit"  # 256 inputs, 96 outputs: 96 % 32 == 0


def test_skip_list_is_a_parameter_and_recorded(ckpt, batch):
    model = load_pretrained(ckpt, quantization={"method": "int8", "skip": ["vision_embed_tokens"]})
    assert isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        assert logits(model, batch).shape[-1] == VOCAB
    cfg = scheme_config(resolve_scheme({"method": "int4", "group_size": 64}))
    assert cfg == {"method": "int4", "group_size": 64, "levels": "normal", "skip": ["vision_embed_tokens", "lm_head"]}
    assert resolve_scheme(cfg) == Int4(group_size=64)


def test_int4_records_its_levels_and_older_records_read_as_uniform():
    """A pre-quantized checkpoint's record names the modules; one written before int4 had a
    choice of levels has no "levels" and holds even ones. A request without it gets normal ones."""
    old = {"method": "int4", "group_size": 128, "skip": ["lm_head"], "modules": ["layers.0.mlp.dense_h_to_4h"]}
    assert resolve_scheme(old).levels == "uniform"
    assert resolve_scheme({**old, "levels": "normal"}).levels == "normal"
    assert resolve_scheme("int4").levels == resolve_scheme({"method": "int4"}).levels == "normal"
    with pytest.raises(ValueError, match="levels 'nf'"):
        resolve_scheme({"method": "int4", "levels": "nf"})


@pytest.mark.parametrize("levels", ["normal", "uniform"])
def test_int4_loads_on_either_levels_and_warns_where_no_kernel_takes_them(ckpt, bf16, batch, levels, capfd):
    """On torch's ops alone (no kernel plan) even levels use torch's int4 kernel; normal ones are
    upcast per call, correct but slow, which the load says in one line."""
    model = load_pretrained(ckpt, quantization={"method": "int4", "levels": levels}, kernels="plain")
    assert model.layers[0].mlp.dense_h_to_4h.levels == levels
    with torch.no_grad():
        assert (logits(model, batch).float() - logits(bf16, batch).float()).abs().mean() < SCHEMES["int4"][1]
    warned = [line for line in capfd.readouterr().err.splitlines() if "upcast per call" in line]
    assert len(warned) == (levels == "normal")


def test_unknown_scheme_is_refused_with_the_choices(ckpt):
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*int8"):
        load_pretrained(ckpt, quantization="int3")


def test_bad_quantization_in_config_names_the_file(tmp_path):
    import json

    ckpt = make_checkpoint(tmp_path, vocab_size=VOCAB, tokenizer=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "quantization": {"method": "int3"}}))
    with pytest.raises(CheckpointError, match="config.json: unknown quantization"):
        load_pretrained(ckpt)


def test_int8_quantization_error_is_within_half_a_step():
    w = torch.randn(300, 256) * torch.rand(300, 1)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (300,)
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("levels", ["uniform", "normal"])
@pytest.mark.parametrize("group", [128, 64])
def test_int4_levels_are_a_search_no_worse_than_min_max_per_group(group, levels, monkeypatch):
    """Each group's (scale, min) is searched for least squared error: never more than min..max
    on the same levels gives in any group, ~15% less over normally distributed weights; the
    normal levels ~15% less again than the even ones; the C fit and the torch fallback (no C
    kernels) agree."""
    from fuyu.model import native, quantize

    w = torch.randn(64, 512)
    nibbles, sz = quantize_int4(w, group, levels)
    assert nibbles.shape == (64, 256) and sz.shape == (512 // group, 64, 2)
    err = (dequantize_int4(nibbles, sz, levels) - w).square().reshape(64, -1, group).sum(-1)
    g = w.reshape(64, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    value = quantize.level_values(levels)
    nearest = value[((g - lo) / step)[..., None].sub(value).abs().argmin(-1)]
    minmax = (nearest * step + lo - g).square().sum(-1)
    assert bool((err <= minmax * (1 + 1e-5)).all())
    assert err.sum() < 0.9 * minmax.sum()
    if levels == "normal":
        even = (dequantize_int4(*quantize_int4(w, group, "uniform"), "uniform") - w).square().sum()
        assert err.sum() < 0.9 * even
    monkeypatch.setattr(native, "library", lambda *a: None)
    q, sm = quantize._int4_fit(w, group, levels)
    torch_err = (value[q.long()].reshape(64, -1, group) * sm[..., :1] + sm[..., 1:] - g).square().sum(-1)
    assert torch.allclose(torch_err.sum(), err.sum(), rtol=1e-3)


def test_int4_normal_levels_are_the_c_kernels_levels(native_lib):
    """model/quantize.py's NORMAL_LEVELS_127 and csrc/quant.h's Q4_NORMAL are one table: a weight
    made dense by the C kernels equals torch's dequantization of the same pieces."""
    from fuyu.model import native
    from fuyu.model.kernels import NativeQuantLinear

    w = torch.randn(16, 256) / 10
    nibbles, sz = quantize_int4(w, 128, "normal")
    module = NativeQuantLinear.from_pieces("int4", {"weight": nibbles, "scales_and_zeros": sz}, None,
                                           torch.float32, 128, "normal")
    want = dequantize_int4(*module.pieces().values(), "normal")
    assert torch.allclose(native.dense(module.spec(), 0, 16, torch.float32), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", [Int8(), Int4(group_size=64)])
def test_kernels_equal_matmul_with_the_dequantized_weight(scheme):
    lin = nn.Linear(128, 96)
    module = scheme.make(lin)
    pieces = scheme.quantize(lin.weight.detach())
    scheme.install(module, pieces, torch.device("cpu"), torch.bfloat16)
    module.bias = lin.bias.detach().to(torch.bfloat16)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    want = x.float() @ scheme.dequantize(pieces).T + lin.bias.detach()
    got = module(x)
    assert got.shape == (3, 5, 96) and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_int8_weights_at_unaligned_file_offsets_are_realigned():
    # safetensors places tensors at arbitrary offsets; torch's int8 kernel crashes on those.
    lin = nn.Linear(1024, 64)
    pieces = Int8().quantize(lin.weight.detach())
    buf = torch.empty(64 * 1024 + 8, dtype=torch.int8)
    unaligned = buf[8:].view(64, 1024)
    unaligned.copy_(pieces["weight"])
    assert unaligned.data_ptr() % 64 != 0
    module = Int8().make(lin)
    Int8().install(module, {**pieces, "weight": unaligned}, torch.device("cpu"), torch.bfloat16)
    module.bias = lin.bias.detach().to(torch.bfloat16)
    assert module(torch.randn(2, 1024, dtype=torch.bfloat16)).shape == (2, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["int8", "int4", "8bit", "nf4"])
def test_quantized_loading_on_cuda_matches_cpu(ckpt, batch, method):
    cpu = load_pretrained(ckpt, quantization=method)
    gpu = load_pretrained(ckpt, device="cuda", quantization=method)
    with torch.no_grad():
        a, b = logits(cpu, batch).float(), logits(gpu, batch).float().cpu()
    assert (a - b).abs().max().item() < SCHEMES[method][0]
    assert generate(gpu, batch, max_new_tokens=4).shape[0] == 2
