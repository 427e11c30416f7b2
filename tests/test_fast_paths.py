"""Every fast path against the plain one: float32 logits within 1e-4 and identical greedy ids
(tiny checkpoints, CPU); the kernel plan, its cache file, its fallback and the way back to plain
weights."""

import json

import pytest
import torch

from fuyu.model import generate, kernels, load_pretrained, logits, native, plan, sample
from fuyu.model.kernels import PackedLinear, restore_plain
from fuyu.model.settings import Settings
from fuyu.testing.checkpoint import make_checkpoint
from fuyu.testing.batches import make_batch

VOCAB = 320


@pytest.fixture(autouse=True)
def _own_cache_dir(own_plan_cache):
    """Kernel plans go to a per-test folder (conftest.own_plan_cache)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fast"), hidden=96, heads=6, layers=3,
                           vocab_size=VOCAB, tokenizer=False, seed=4)


@pytest.fixture(scope="module")
def batch():
    return make_batch([(3, 4, 5), (1, 2, 3)], VOCAB, seed=9)


@pytest.fixture(scope="module")
def plain32(ckpt, batch):
    model = load_pretrained(ckpt, dtype=torch.float32, kernels="plain")
    with torch.inference_mode():
        return model, logits(model, batch), generate(model, batch, 16, eos_id=-1)


# Which Linears each kernel serves (the plan offers +f32 for 16-bit weights only, but the modules
# serve any dtype, so their equivalence is tested where it is exact enough).
SERVES = {"packed": lambda m: kernels.kind(m) == "float" and kernels.can_pack(m.weight),
          "native": lambda m: kernels.kind(m) == "float" or kernels.NativeQuantLinear.serves(
              kernels.kind(m), m.out_features, m.in_features, getattr(m, "group", 0)),
          "linear+f32": lambda m: kernels.kind(m) == "float", "native+f32": lambda m: kernels.kind(m) == "float",
          "int8+dequant": lambda m: kernels.kind(m) == "int8"}


def every(kernel):
    return lambda name, module: kernel if SERVES[kernel](module) else None


@pytest.mark.parametrize("kernel, swapped", [("packed", 14), ("native", 14), ("linear+f32", 14), ("native+f32", 14)])
def test_each_kernel_gives_the_plain_float32_logits_and_greedy_ids(ckpt, batch, plain32, kernel, swapped, request):
    if kernel.startswith("native"):
        request.getfixturevalue("native_lib")  # built, or the test fails (skips without a compiler)
    model = load_pretrained(ckpt, dtype=torch.float32, kernels="plain")
    if not SERVES[kernel](model.lm_head):
        pytest.skip(f"no {kernel} kernel on this machine (packed: oneDNN)")
    # 14: the patch projection, 3 layers × 4 Linears, the LM head
    assert len(kernels.apply(model, every(kernel))) == swapped
    with torch.inference_mode():
        assert (logits(model, batch) - plain32[1]).abs().max().item() < 1e-4
        assert generate(model, batch, 16, eos_id=-1).tolist() == plain32[2].tolist()


def test_int8_dequantized_prefill_equals_the_int8_kernel(ckpt, batch):
    model = load_pretrained(ckpt, dtype=torch.float32, quantization="int8", kernels="plain")
    with torch.inference_mode():
        want, ids = logits(model, batch), generate(model, batch, 12, eos_id=-1)
        assert len(kernels.apply(model, every("int8+dequant"))) == 3 * 4
        assert (logits(model, batch) - want).abs().max().item() < 1e-4
        assert generate(model, batch, 12, eos_id=-1).tolist() == ids.tolist()


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_ids_in_float32(ckpt, batch, plain32):
    import torch._dynamo

    model = plain32[0]
    counts = torch._dynamo.utils.counters
    counts.clear()
    assert generate(model, batch, 16, eos_id=-1, compile=True).tolist() == plain32[2].tolist()
    graphs = counts["stats"]["unique_graphs"]
    assert graphs >= 1  # the compiled step really ran
    shorter = make_batch([(3, 4, 2), (1, 2, 1)], VOCAB, seed=3)  # another prompt length, same cache size
    assert generate(model, shorter, 8, eos_id=-1, compile=True).tolist() == generate(model, shorter, 8, eos_id=-1).tolist()
    assert counts["stats"]["unique_graphs"] == graphs  # no recompile: the step's shapes are fixed


def test_restore_plain_gives_back_the_exact_weights(ckpt, tmp_path, batch):
    from fuyu.model.convert import save_pretrained

    want = load_pretrained(ckpt, dtype=torch.bfloat16, kernels="plain").state_dict()
    model = load_pretrained(ckpt, dtype=torch.bfloat16, kernels="plain")
    if not kernels.can_pack(model.lm_head.weight):
        pytest.skip("no oneDNN bf16 on this CPU")
    kernels.apply(model, every("packed"))
    got = model.state_dict()  # packed weights come out under nn.Linear's keys, exactly
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    save_pretrained(model, tmp_path / "saved", model.config, dtype=torch.bfloat16)
    saved = load_pretrained(tmp_path / "saved", dtype=torch.bfloat16, kernels="plain").state_dict()
    assert all(torch.equal(saved[k], want[k]) for k in want)
    layer = model.layers[0].mlp.dense_h_to_4h
    with pytest.raises(RuntimeError, match="restore_plain"):
        layer(torch.ones(1, 96, dtype=torch.bfloat16, requires_grad=True))
    restore_plain(model)
    assert all(type(m) is not PackedLinear for m in model.modules())
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model.requires_grad_(True)  # trainable again: every weight is a plain Parameter
    assert all(p.requires_grad for p in model.parameters())
    assert {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} == {"Linear"}


def test_the_plan_is_timed_once_per_machine_and_model_and_cached_in_the_user_cache(ckpt, tmp_path, monkeypatch):
    timed = []
    real = plan.time_plans
    monkeypatch.setattr(plan, "time_plans", lambda shape, settings: (timed.append(shape), real(shape, settings))[1])
    monkeypatch.setattr(plan, "CPU_SHARE", 0.0)  # keep the plan, however busy the machine
    monkeypatch.setenv("FUYU_KERNELS", "auto")  # the default outside the test suite
    model = load_pretrained(ckpt, dtype=torch.bfloat16)
    chosen = model.backend.plan
    assert len(timed) == 1 and chosen.how == "timed"
    path = plan.cache_file(Settings.from_environment())
    assert path.is_relative_to(tmp_path / "xdg" / "fuyu")
    entry, = json.loads(path.read_text())["entries"].values()
    # every candidate of both parts timed: decode steps at 1, 2 and 8 rows, the layers' prefill
    for part in ("layers", "head"):
        offered = plan.candidates(timed[0], part, Settings.from_environment())
        assert set(entry["timings"][part]) == set(offered) and entry[part] == getattr(chosen, part)
        assert all(len(t["ms"]) == len(plan.ROWS) + 1 and t["ms"][0] > 0 for t in entry["timings"][part].values())
        best = min(entry["timings"][part].values(), key=lambda t: t["score"])
        assert entry["timings"][part][getattr(chosen, part)] == best
    in_use = plan.report(model, chosen)["in_use"]
    assert sum(r["modules"] for r in in_use.values()) == 3 * 4 + 2
    assert load_pretrained(ckpt, dtype=torch.bfloat16).backend.plan.how == "cached" and len(timed) == 1
    load_pretrained(ckpt, dtype=torch.float32)  # another dtype: another entry
    monkeypatch.setattr(plan.native_build, "cpu_flags", lambda: "flags : fpu sse2")  # another CPU kind
    load_pretrained(ckpt, dtype=torch.bfloat16)
    assert len(timed) == 3 and len(json.loads(path.read_text())["entries"]) == 3


@pytest.mark.usefixtures("native_lib")
def test_a_cached_plan_naming_kernels_not_offered_falls_back_without_error(ckpt, batch, monkeypatch):
    """A cached plan that names the native kernels where they cannot be had now (FUYU_NATIVE=0 or
    no compiler): the best other candidate it timed serves, or oneDNN's packed kernel."""
    monkeypatch.setenv("FUYU_KERNELS", "auto")
    settings = Settings.from_environment()
    shape = plan.Shape.of(load_pretrained(ckpt, dtype=torch.bfloat16, kernels="plain"), torch.bfloat16)
    timings = {"layers": {"native": {"ms": [1, 1, 1, 1], "score": 1.0}, "linear": {"ms": [2, 2, 2, 2], "score": 2.0}},
               "head": {"native": {"ms": [1, 1, 1, None], "score": 1.0}}}
    plan.save(plan.cache_file(settings), shape.key(), plan.Plan("native", "native", timings=timings))
    assert load_pretrained(ckpt, dtype=torch.bfloat16).backend.plan.layers == "native"  # offered: used as cached
    monkeypatch.setenv("FUYU_NATIVE", "0")
    model = load_pretrained(ckpt, dtype=torch.bfloat16)
    chosen = model.backend.plan
    assert chosen.how == "fallback" and chosen.layers == "linear"  # the best it timed that is offered
    assert chosen.head == ("packed" if kernels.can_pack(torch.empty(0, dtype=torch.bfloat16)) else "linear")
    assert "native" not in set(kernels.in_use(model).values())
    with torch.inference_mode():
        assert generate(model, batch, 4, eos_id=-1).shape == (2, 4)
    monkeypatch.setenv("FUYU_KERNELS", "native")  # a fixed plan falls back alike
    assert "native" not in set(kernels.in_use(load_pretrained(ckpt, dtype=torch.bfloat16)).values())


@pytest.mark.usefixtures("native_lib")
def test_a_plan_with_8_bit_prefill_loads_int8_layers_for_it(tmp_path, batch, monkeypatch):
    """int8 layers offer "native+w8a8" (decode: native; prefill: 8-bit inputs, torch's int8 GEMM),
    the head does not; a plan naming it lays every layer Linear out for it as the checkpoint is
    read; its prefill logits stay within the inputs' 8-bit rounding of the 16-bit prefill's, and
    without the C kernels it falls back to the best other candidate it timed."""
    ckpt = make_checkpoint(tmp_path / "ck", hidden=128, heads=4, layers=2, vocab_size=VOCAB, tokenizer=False, seed=5)
    monkeypatch.setenv("FUYU_KERNELS", "auto")
    settings = Settings.from_environment()
    shape = plan.Shape.of(load_pretrained(ckpt, dtype=torch.bfloat16, quantization="int8", kernels="plain"),
                          torch.bfloat16)
    assert "native+w8a8" in plan.candidates(shape, "layers", settings)
    assert "native+w8a8" not in plan.candidates(shape, "head", settings)
    timings = {"layers": {"native+w8a8": {"ms": [1, 1, 1, 1], "score": 1.0}, "native": {"ms": [1, 1, 1, 2], "score": 3.0},
                          "int8+dequant": {"ms": [2, 2, 2, 2], "score": 4.0}},
               "head": {"native": {"ms": [1, 1, 1, None], "score": 1.0}}}
    plan.save(plan.cache_file(settings), shape.key(), plan.Plan("native+w8a8", "native", timings=timings))
    model = load_pretrained(ckpt, dtype=torch.bfloat16, quantization="int8")
    in_use = kernels.in_use(model)
    assert {k for n, k in in_use.items() if n.startswith("layers.")} == {"native+w8a8"}
    assert all(m.prefill == "w8a8" for m in model.modules() if type(m) is kernels.NativeQuantLinear
               and m.method == "int8" and m is not model.lm_head)
    dense = load_pretrained(ckpt, dtype=torch.bfloat16, quantization="int8", kernels="native")
    with torch.inference_mode():
        got, want = logits(model, batch).float(), logits(dense, batch).float()
        assert 0 < (got - want).abs().max() <= 0.05 * want.abs().max()
        assert generate(model, batch, 4, eos_id=-1).shape == (2, 4)
    monkeypatch.setenv("FUYU_KERNELS", "native+w8a8")  # fixed: the head and 16-bit layers get "native"
    fixed = load_pretrained(ckpt, dtype=torch.bfloat16, quantization="int8").backend.plan
    assert (fixed.layers, fixed.head, fixed.how) == ("native+w8a8", "native", "fixed")
    fixed = load_pretrained(ckpt, dtype=torch.bfloat16).backend.plan
    assert (fixed.layers, fixed.head) == ("native", "native")
    monkeypatch.setenv("FUYU_KERNELS", "auto")
    monkeypatch.setenv("FUYU_NATIVE", "0")
    chosen = load_pretrained(ckpt, dtype=torch.bfloat16, quantization="int8").backend.plan
    assert chosen.how == "fallback" and chosen.layers == "int8+dequant"


def test_fuyu_kernels_plain_turns_the_kernel_plan_off(ckpt, monkeypatch):
    monkeypatch.setenv("FUYU_KERNELS", "plain")
    model = load_pretrained(ckpt, dtype=torch.bfloat16)
    assert set(kernels.in_use(model).values()) == {"linear"}
    assert not plan.cache_file(Settings.from_environment()).exists()
    with pytest.raises(ValueError, match="kernels='fast'"):
        load_pretrained(ckpt, kernels="fast")


def test_rotary_rounds_like_the_reference_formula():
    from fuyu.model.cache import rotary_tables
    from fuyu.model.fuyu import apply_partial_rotary

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 64, generator=g)  # (B, H, T, d)
    cos, sin = rotary_tables(7 * 37, 32, 25000.0, "cpu")
    pos = torch.arange(7).expand(2, 7) * 37
    cos, sin = cos[pos][:, None], sin[pos][:, None]
    # the reference's rotary: x_rot·cos + rotate_half(x_rot)·sin with cos/sin over all 32 rotary dims
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rot, rest = x[..., :32], x[..., 32:]
    rotate_half = torch.cat((-rot[..., 16:], rot[..., :16]), -1)
    assert torch.equal(apply_partial_rotary(x, cos, sin), torch.cat((rot * c + rotate_half * s, rest), -1))


@pytest.mark.parametrize("path, chunk", [("native", 0), ("torch", 1 << 20), ("torch", 64 * 8)])  # torch:
# one slice of slots, and many (with a short last one)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_attention_equals_sdpa(monkeypatch, request, path, chunk, dtype):
    """One query per row over a masked cache, through fuyu.model.native's kernel or the torch ops:
    float32 within 1e-5 of SDPA; in bf16 no further from float32 SDPA than bf16 SDPA itself is."""
    from fuyu.model import fuyu

    if path == "native":
        request.getfixturevalue("native_lib")
    else:
        monkeypatch.setattr(fuyu, "DECODE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    B, H, S, d = 3, 4, 77, 16
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (1, S, S))
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    mask[..., -1] = True  # a query always sees its own slot
    truth = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ours = native.attend(q, k, v, mask) if path == "native" else fuyu.decode_attention(q, k, v, mask)
    assert ours.dtype == dtype and ours.shape == (B, H, 1, d)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, truth, atol=1e-5, rtol=0)
    else:
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (ours.float() - truth).abs().max() <= (theirs.float() - truth).abs().max() * 1.25


# Built, or the test fails; skipped only where there is no C compiler (conftest.native_lib).
needs_native = pytest.mark.usefixtures("native_lib")


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_kernel_is_float32_accumulated_f_linear(rows, dtype):
    torch.manual_seed(rows)
    w, b = torch.randn(515, 333).to(dtype), torch.randn(515).to(dtype)
    x = torch.randn(rows, 7, 333).to(dtype)[:, -1]  # a strided view, as a prefill's last positions
    for bias in (b, None):
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = native.linear(x, w, bias)
        assert got.dtype == dtype and got.shape == (rows, 515)
        err = (got.double() - exact).abs()
        if dtype == torch.float32:
            assert err.max().item() < 1e-4
        else:  # a float32-accurate sum rounded once to bf16: within one bf16 ulp (2⁻⁸ relative)
            assert (err <= exact.abs() * 2 ** -8 + 1e-6).all()
    with pytest.raises(ValueError, match="at most 8 rows"):
        native.linear(torch.randn(9, 333).to(dtype), w, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_prefill_gemm_rounds_once_and_is_no_less_accurate(dtype):
    """+f32: a float32 GEMM over the widened weight, block by block, rounded once at the end."""
    torch.manual_seed(0)
    w, b = torch.randn(2100, 96).to(dtype), torch.randn(2100).to(dtype)
    x = torch.randn(3, 11, 96).to(dtype)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = kernels.wide_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (3, 11, 2100)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert ((got.double() - exact).abs() <= exact.abs() * ulp + 1e-5).all()
    plain = torch.nn.functional.linear(x, w, b)
    # (where F.linear also rounds a float32 sum once, the two differ only in ties and sum order)
    assert (got.double() - exact).abs().mean() <= (plain.double() - exact).abs().mean() * 1.05
    layer = torch.nn.Linear(96, 2100).to(dtype)
    wide = kernels.use(layer, "linear+f32")
    assert kernels.kernel_of(wide) == "linear+f32" and torch.equal(wide.plain().weight, layer.weight)
    with torch.inference_mode():  # decode-sized calls stay F.linear
        one = x[:1, :1]
        assert torch.equal(wide(one), torch.nn.functional.linear(one, layer.weight, layer.bias))


@needs_native
def test_compiled_decode_through_the_native_kernel_gives_the_eager_greedy_ids(ckpt, batch, plain32):
    model = load_pretrained(ckpt, dtype=torch.float32, kernels="plain")
    assert len(kernels.apply(model, every("native"))) == 14
    with torch.inference_mode():
        assert generate(model, batch, 12, eos_id=-1, compile=True).tolist() == plain32[2][:, :12].tolist()


def test_no_compiler_means_no_native_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library() is None and not native.available()
    shape = plan.Shape(64, 256, 4, 2, 512, torch.bfloat16, "float", "float")
    assert not any(k.startswith("native") for part in ("layers", "head")
                   for k in plan.candidates(shape, part, Settings.from_environment()))
    monkeypatch.delenv("CC")
    monkeypatch.setenv("FUYU_NATIVE", "0")
    assert native.library() is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_through_the_fused_layers_equal_their_torch_ops(tmp_path, monkeypatch, dtype):
    """Decode steps through the CPU backend's fused step (every layer in one native call) against
    the plain step's torch ops, teacher-forced over left-padded rows: float32 within 1e-4 and the
    same greedy ids; bf16 no further from the torch ops than they are from float32. (The fused
    layers' own math at random shapes: tests/test_native.py.)"""
    from fuyu.model import backend, decode_step, prefill

    hidden, heads = 60, 3  # head dim 20: no vector multiple
    ckpt = make_checkpoint(tmp_path / "c", hidden=hidden, heads=heads, layers=2, vocab_size=VOCAB,
                           tokenizer=False, seed=5)
    batch = make_batch([(2, 3, 4), (1, 2, 7), (2, 2, 1)], VOCAB, seed=3)
    forced = torch.randint(10, VOCAB, (6, 3), generator=torch.Generator().manual_seed(1))
    served = []
    real = backend.CpuBackend.step

    def run(model, fused):
        monkeypatch.setattr(backend.CpuBackend, "step", lambda self, m, c, ids: served.append(real(self, m, c, ids))
                            or served[-1] if fused else None)
        with torch.inference_mode():
            cache, last = prefill(model, batch, max_new_tokens=len(forced))
            return torch.stack([last] + [decode_step(model, cache, ids) for ids in forced]).float()

    f32 = run(load_pretrained(ckpt, dtype=torch.float32, kernels="plain"), fused=False)
    model = load_pretrained(ckpt, dtype=dtype, kernels="plain")
    kernels.apply(model, every("native"))
    ours, torch_ops = run(model, fused=True), run(model, fused=False)
    assert served and all(layers is not None for layers in served)
    if dtype == torch.float32:
        assert (ours - torch_ops).abs().max().item() < 1e-4
        assert torch.equal(ours.argmax(-1), torch_ops.argmax(-1))
    else:
        assert (ours - torch_ops).abs().max() <= 2 * (torch_ops - f32).abs().max()
        assert (ours - f32).abs().mean() <= 1.25 * (torch_ops - f32).abs().mean()


@needs_native
def test_fused_layers_need_the_native_gemv_in_every_layer(ckpt):
    from fuyu.model import KVCache

    model = load_pretrained(ckpt, dtype=torch.float32, kernels="plain")
    assert model.backend.layers(model, KVCache.for_model(model, 1, 8)) is None  # plain: the torch ops
    kernels.apply(model, lambda name, m: "native" if name != "layers.1.mlp.dense_4h_to_h" else None)
    assert model.backend.layers(model, KVCache.for_model(model, 1, 8)) is None
    kernels.apply(model, every("native"))
    assert isinstance(model.backend.layers(model, KVCache.for_model(model, 1, 8)), native.Layers)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_argmax_is_torch_argmax_with_ties_nan_and_infinities(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1003, generator=g).to(dtype)  # 1003: a tail after the last whole vector
    x[1, 40] = x[1, 900] = 50  # a tie: the first
    x[2, 7] = x[2, 3] = float("nan")  # NaN wins, the first one
    x[3] = float("-inf")
    x[4, 1002] = 80  # the maximum in the tail
    assert torch.equal(native.argmax(x), x.float().argmax(-1))
    assert native.argmax(x.t()) is None and native.argmax(x.half()) is None  # not served: torch's
    assert torch.equal(sample(x, argmax=native.argmax), x.float().argmax(-1))  # as greedy sampling uses it


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_q_k_pass_equals_its_torch_ops(ckpt, batch, dtype, monkeypatch):
    """The CPU backend's prefill pass (q/k LayerNorms, rotary and the cache write in one C call)
    against the torch ops, over left-padded rows, a batch split in parts (rows at an offset) and a
    continuation after an encoded prefix (slots from the prefix's end): the same logits (float32
    within 1e-5; bf16 within a rounding of the keys) and the same cache."""
    from fuyu.model import backend, encode_prefix, prefill

    model = load_pretrained(ckpt, dtype=dtype, kernels="plain")
    served = []
    real = backend.CpuBackend.qkv_rows
    parts = [make_batch([(1, 2, 3)], VOCAB, seed=1), make_batch([(2, 2, 5), (1, 1, 2)], VOCAB, seed=2)]
    head = torch.randint(10, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))

    def run(fast):
        monkeypatch.setattr(backend.CpuBackend, "qkv_rows", lambda self, *a: served.append(real(self, *a))
                            or served[-1] if fast else None)
        with torch.inference_mode():
            out = []
            for cache, last in (prefill(model, batch, 2), prefill(model, parts, 2),
                                prefill(model, batch, 2, prefix=encode_prefix(model, head))):
                out += [last.float(), *(t.float() for t in cache.k + cache.v)]
            return out

    ours, torch_ops = run(True), run(False)
    assert served and all(got is not None for got in served)
    tol = 1e-5 if dtype == torch.float32 else 0.02
    for a, b in zip(ours, torch_ops):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
