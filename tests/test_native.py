"""The C kernels as source (fuyu.model.native): the build shows a broken file's compiler message,
the bindings come from the table of prototypes, the fused decoder layers compute model/fuyu.py's
layer, and the .c files ship in the wheel."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fuyu.model import kernels, native
from fuyu.model.cache import KVCache
from fuyu.model.config import FuyuConfig
from fuyu.model.fuyu import Block
from fuyu.model.native import build

REPO = Path(__file__).resolve().parents[1]
CC = shutil.which(os.environ.get("CC") or "cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


def broken_copy(tmp_path, edit) -> Path:
    """A copy of the C sources with one file changed by edit(name, text) -> text."""
    src = tmp_path / "csrc"
    shutil.copytree(build.SOURCE_DIR, src)
    changed = 0
    for p in src.iterdir():
        text = p.read_text()
        changed += p.write_text(edit(p.name, text)) and p.read_text() != text
    assert changed == 1  # the edit still finds what it breaks
    return src


@needs_cc
@pytest.mark.parametrize("what, edit, messages", [
    ("a syntax error", lambda name, text: text.replace("return f;", "return f", 1) if name == "vec.h" else text,
     ("vec.h:", "error: expected")),
    # a definition that no longer matches the table of prototypes: caught by the compiler, not at run time
    ("a signature off the table", lambda name, text: text.replace(
        "void fuyu_argmax(const void *x, dtype dt, int64_t B, int64_t V, int64_t *out) {",
        "void fuyu_argmax(const void *x, dtype dt, int B, int64_t V, int64_t *out) {") if name == "native.c" else text,
     ("native.c:", "error: conflicting types for", "fuyu_argmax")),
])
def test_a_broken_c_file_is_a_failed_build_with_the_compilers_message(tmp_path, what, edit, messages):
    src = broken_copy(tmp_path, edit)
    lib = tmp_path / "out" / "native-test.so"
    result = build.build(lib, CC, source_dir=src)
    assert not result.ok and not lib.exists(), what
    assert all(m in result.output and m in result.log.read_text() for m in messages), result.output
    assert "error" in result.summary() and result.log.read_text().startswith(" ".join(result.command))


@needs_cc
def test_a_failed_build_at_run_time_is_one_warning_line_and_no_kernels(tmp_path, capfd):
    """A compiler that exists but fails: the torch ops serve, stderr says so once, the log keeps
    the compiler's output."""
    cc = tmp_path / "failing-cc"
    cc.write_text("#!/bin/sh\necho 'native.c:1:1: error: this compiler always fails' >&2\nexit 1\n")
    cc.chmod(0o755)
    settings = native.Settings(compiler=str(cc), cache_dir=tmp_path / "cache")
    assert native.library(settings) is None and native.library(settings) is None  # asked twice
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuyu: warning:") and "this compiler always fails" in lines[0]
    got = native.outcome(settings)
    assert "always fails" in got.build.log.read_text()
    assert native.outcome(native.Settings(compiler=str(tmp_path / "no-cc"), cache_dir=tmp_path)).reason.startswith(
        "no C compiler")


def test_the_bindings_are_the_table_of_prototypes(native_lib):
    """Every exported function is bound from csrc/native.h, with the C types' ctypes."""
    table = build.prototypes()
    assert set(table) == {"fuyu_linear", "fuyu_scratch_bytes", "fuyu_dequant", "fuyu_attend", "fuyu_layers",
                          "fuyu_layers_work_bytes", "fuyu_argmax", "fuyu_qkv_rows", "fuyu_flash", "fuyu_flash_work_bytes",
                          "fuyu_int4_fit", "fuyu_q8_quantize", "fuyu_q8_scratch_bytes", "fuyu_q8_rows",
                          "fuyu_q8_finish"}
    P, I32, I64 = build.ctypes.c_void_p, build.ctypes.c_int, build.ctypes.c_int64
    assert table["fuyu_argmax"] == (None, [P, I32, I64, I64, P])  # x, dtype, B, V, out
    assert table["fuyu_layers"][0] is I32 and table["fuyu_scratch_bytes"] == (I64, [I64, I64])
    assert build.enum_codes("dtype") == {"F32": 0, "BF16": 1} and native.DTYPE[torch.bfloat16] == 1
    assert build.enum_codes("wformat") == native.FORMAT == {"PLAIN": 0, "INT8": 1, "INT4": 2, "INT4N": 3}
    for name, (restype, argtypes) in table.items():
        fn = getattr(native_lib, name)
        assert fn.argtypes == argtypes and fn.restype == restype


def test_the_build_command_line_builds_in_view(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "fuyu.model.native", "build"], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    if CC is None:
        assert r.returncode == 1 and "no C compiler" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    command, built, log = r.stdout.splitlines()
    assert command.startswith(CC) and "-O3" in command and str(build.SOURCE_DIR / "native.c") in command
    assert built.startswith("built: ") and Path(built.removeprefix("built: ")).is_file()
    assert Path(log.removeprefix("log: ")).read_text().startswith(command)


# --- the fused decoder layers against model/fuyu.py's ----------------------------------------

def random_layers(g: torch.Generator, dtype):
    """A random shape (heads, head dim with and without a vector multiple, rotary share, MLP width,
    batch, cache length, the slot written) and random layers of it, LayerNorm affines included."""
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    heads, d = pick(1, 2, 3, 5), pick(8, 16, 20, 36, 64)
    rotary = pick(0.5, 1.0) if d % 8 else pick(0.25, 0.5, 1.0)  # an even number of rotary dims
    cfg = FuyuConfig.tiny(hidden_size=heads * d, num_attention_heads=heads, num_hidden_layers=2,
                          intermediate_size=pick(24, 100, 3 * heads * d), partial_rotary_factor=rotary)
    blocks = [Block(cfg) for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for p in (p for b in blocks for p in b.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    blocks = [b.to(dtype).requires_grad_(False) for b in blocks]
    B, S = pick(1, 2, 3, 8), pick(9, 40, 100)
    return cfg, blocks, B, S, int(torch.randint(S // 2, S, (1,), generator=g))  # the slot written


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_compute_the_layers_of_fuyu_py(native_lib, seed, dtype):
    """native.Layers (every decoder layer of a decode step in one C call) against Block.forward
    of model/fuyu.py at random shapes, over a cache of random keys and values with slots left out
    per row: the residual stream and the keys and values written. float32 within 1e-4; bf16 with
    the roundings of the torch ops in bf16."""
    g = torch.Generator().manual_seed(seed)
    cfg, blocks, B, S, at = random_layers(g, dtype)
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_attention_heads, S, cfg.head_dim, cfg.rotary_dim,
                    cfg.rope_theta, "cpu", dtype)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.valid[:, :at] = torch.rand(B, at, generator=g) < 0.7
    cache.next_position[:] = torch.randint(1, at + 1, (B,), generator=g)  # rotary positions
    cache.length = at
    cache.start_decoding()
    positions = cache.step()
    window = cache.window(1)
    cos, sin = cache.rotary(positions)
    x = torch.randn(B, 1, cfg.hidden_size, generator=g)

    def torch_ops(blocks, dt):
        k, v = [t.to(dt) for t in cache.k], [t.to(dt) for t in cache.v]
        h = x
        with torch.inference_mode():
            for i, block in enumerate(blocks):
                h = block(h, cos, sin, cache.layer(i, window)._replace(k=k[i], v=v[i]))
        return h, k, v

    fused_k, fused_v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    layers = native.Layers.build([plain_spec(b) for b in blocks], fused_k, fused_v,
                                 cfg.layer_norm_eps, cfg.intermediate_size)
    assert layers is not None
    ours = layers(x, cos.contiguous(), sin.contiguous(), window.slots, window.mask)
    theirs, k, v = torch_ops(blocks, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        for a, b in zip((*fused_k, *fused_v), (*k, *v)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        f32, _, _ = torch_ops([_float(b, cfg) for b in blocks], torch.float32)
        assert (ours - f32).abs().max() <= 2 * (theirs - f32).abs().max() + 1e-6
        # the same roundings as the torch ops: ours sits far closer to theirs than either to float32
        # (a dropped rounding, e.g. of relu² in bf16, puts it 0.4-1.1 of that distance away)
        assert (ours - theirs).abs().mean() <= 0.1 * (theirs - f32).abs().mean()
        for a, b in zip((*fused_k, *fused_v), (*k, *v)):  # each written value rounded once, alike
            assert (a.float() - b.float()).abs().max() <= b.float().abs().max() * 2 ** -7


def plain_spec(block):
    """A plain Block as native.Layers takes it (kernels.layer_spec asks for native Linears)."""
    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, attn.q_layernorm, attn.k_layernorm, block.post_attention_layernorm)
    linears = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    return ([t for n in norms for t in (n.weight, n.bias)],
            [native.Weight("PLAIN", m.weight, None, m.bias, m.out_features, m.in_features) for m in linears])


def _float(block, cfg):
    out = Block(cfg)
    out.load_state_dict({k: t.float() for k, t in block.state_dict().items()})
    return out.requires_grad_(False)


# --- the package ---------------------------------------------------------------------------------

@needs_cc
@pytest.mark.slow
def test_the_wheel_ships_the_c_and_a_decode_step_runs_on_kernels_built_from_it(tmp_path):
    """pip wheel, a non-editable install into a fresh venv (torch inherited), and from another
    folder a decode step on the native kernels, compiled from the installed csrc/ files."""
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:  # the working tree as it is, without build leftovers
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(tree), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                   check=True, timeout=600)
    wheel, = wheels.glob("fuyu-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # --system-site-packages inherits the base interpreter's packages; torch and the rest of this
    # environment's come through a .pth line, after the new venv's own site-packages
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "inherited.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=600)
    run = tmp_path / "elsewhere"
    run.mkdir()
    script = textwrap.dedent("""
        import torch
        from pathlib import Path
        import fuyu.model
        from fuyu.model import Fuyu, FuyuConfig, decode_step, kernels, native, prefill
        from fuyu.model.native import build
        from fuyu.model.settings import Settings
        from fuyu.model.weights import for_inference
        assert "site-packages" in fuyu.model.__file__, fuyu.model.__file__
        assert sorted(p.name for p in build.SOURCE_DIR.iterdir() if p.suffix in (".c", ".h")) == [
            "attend.h", "flash.h", "gemv.h", "isa.h", "linear.h", "native.c", "native.h", "quant.h", "vec.h"], build.SOURCE_DIR
        got = native.outcome()
        assert got.lib is not None and got.build is not None, got.reason  # built now, from those files
        assert str(build.SOURCE_DIR / "native.c") in got.build.command
        torch.manual_seed(0)
        model = for_inference(Fuyu(FuyuConfig.tiny()), kernels="plain", settings=Settings.from_environment())
        kernels.apply(model, lambda name, m: "native")
        ids = torch.randint(10, 500, (1, 5))
        with torch.inference_mode():
            cache, last = prefill(model, {"input_ids": ids}, max_new_tokens=2)
            assert isinstance(model.backend.layers(model, cache), native.Layers)
            step = decode_step(model, cache, last.argmax(-1))
        assert step.shape == (1, 512) and torch.isfinite(step).all()
        print("decoded", Path(fuyu.model.__file__).parent)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUYU_", "PYTHONPATH"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    r = subprocess.run([str(python), "-c", script], cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("decoded " + site), r.stdout


# --- the quantized kernels ---------------------------------------------------------------------

def quantized(linear, method, group, levels=""):
    """linear quantized by `method` ("int8", "int4"; int4 on `levels`, "normal" or "uniform")."""
    from fuyu.model.quantize import scheme_of

    scheme = scheme_of(method, group, levels)
    pieces = scheme.quantize(linear.weight.float())
    levels = getattr(scheme, "levels", "")
    return (kernels.NativeQuantLinear.from_pieces(method, pieces, linear.bias, linear.weight.dtype, group, levels),
            scheme, pieces)


QUANTIZED = [("int8", 0, ""), ("int4", 128, "normal"), ("int4", 64, "normal"), ("int4", 128, "uniform"),
             ("int4", 64, "uniform")]


@pytest.mark.parametrize("method, group, levels", QUANTIZED)
def test_quantized_kernels_compute_the_dequantized_product(native_lib, method, group, levels):
    """Decode-sized calls (int16-quantized inputs, exact integer sums) and prefill-sized ones (dense
    blocks, a 16-bit GEMM) against the dequantized weight in float64: within the inputs' own
    bfloat16 rounding; the pieces come back exactly (int4's scales as float16 keeps them)."""
    g = torch.Generator().manual_seed(len(method) + group + len(levels))
    linear = torch.nn.Linear(512, 272).bfloat16().requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(272, 512, generator=g) / 20)
    module, scheme, pieces = quantized(linear, method, group, levels)
    assert module.spec().fmt == {"": "INT8", "normal": "INT4N", "uniform": "INT4"}[levels]
    w = scheme.dequantize(module.pieces()).double()
    for rows in (1, 2, 3, 4, 5, 8, 9, 40):
        x = torch.randn(rows, 512, generator=g).bfloat16()
        exact = x.double() @ w.T + linear.bias.double()
        got = module(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 272)
        # the output's one bf16 rounding (2^-8), plus the integer path's input quantization (int8:
        # half a step of 2^-15 of the row's largest input; int4: of 2^-7 of the group's largest) or
        # the prefill's weight rounding to bf16 (int4: 2^-8 a weight)
        xa = x.double().abs()
        if method == "int8":
            step = xa.amax(-1, keepdim=True).expand_as(xa) / 32512
        else:
            step = xa.view(rows, -1, group).amax(-1, keepdim=True).expand(rows, 512 // group, group).reshape(rows, 512) / 127
        bound = exact.abs() * 2 ** -8 + (step / 2 + xa * 2 ** -8) @ w.abs().T + 1e-3
        assert ((got.double() - exact).abs() <= bound).all(), (rows, (got.double() - exact).abs().max())
    back = module.pieces()
    assert torch.equal(back["weight"], pieces["weight"])
    if method == "int8":
        assert torch.equal(back["scales"], pieces["scales"])
    else:
        assert torch.equal(back["scales_and_zeros"], module.pieces()["scales_and_zeros"])
        # kept as float16 (scale, min = zero - 8 scale): each within half a float16 step of its own
        scale, zero = pieces["scales_and_zeros"].unbind(-1)
        ulp = (zero - 8 * scale).abs() * 2 ** -11 + 8 * scale.abs() * 2 ** -11
        err = (back["scales_and_zeros"] - pieces["scales_and_zeros"]).abs()
        assert (err[..., 0] <= scale.abs() * 2 ** -11 + 1e-9).all() and (err[..., 1] <= ulp * 1.01 + 1e-9).all()
    plain = module.plain()  # torch's own module again, same values
    assert type(plain).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear"}[method]
    assert getattr(plain, "levels", "") == levels
    x = torch.randn(3, 512, generator=g).bfloat16()
    assert (plain(x).float() - module(x).float()).abs().max() <= module(x).float().abs().max() * 2 ** -5


def test_prefill_rows_become_8_bit_integers_with_outlier_columns_left_out(native_lib):
    """q8_quantize: each row's own scale (its largest |x| outside the outlier columns -> 127), each
    value within half a step; a column where some |x| reaches the limit is an outlier (0 in xq)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 256, generator=g)
    x[5, 17], x[30, 200], x[2, 9] = 9.0, -6.0, 5.9  # two outlier columns; 5.9 is not one
    for rows in (x, x.bfloat16()):
        xq, sx, cols = native.q8_quantize(rows.contiguous(), 6.0)
        assert cols.tolist() == [17, 200]
        xf = rows.double().clone()
        xf[:, cols] = 0
        assert (xq[:, cols] == 0).all()
        assert torch.allclose(sx.double(), xf.abs().amax(1) / 127, rtol=1e-6)
        assert ((xq.double() * sx.double()[:, None] - xf).abs() <= sx.double()[:, None] / 2 * (1 + 1e-5)).all()
        assert xq.abs().amax(1).eq(127).all()
    assert native.q8_quantize(x.contiguous(), float("inf"))[2].numel() == 0


def test_int8_prefill_with_8_bit_inputs_is_the_integer_product_plus_the_outlier_columns(native_lib):
    """The "native+w8a8" prefill: the int8 inputs' exact integer product with the int8 weight,
    scaled, plus the outlier columns in float32, rounded once (against float64, from the same
    integers); decode-sized calls are the plain native ones; with more than MAX_OUTLIER_SHARE of
    the columns outliers, the call is the 16-bit path's, exactly."""
    g = torch.Generator().manual_seed(11)
    linear = torch.nn.Linear(512, 2052).bfloat16().requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2052, 512, generator=g) / 20)
    dense, scheme, pieces = quantized(linear, "int8", 0)
    fast = kernels.use(dense, "native+w8a8")
    assert fast.kernel == "native+w8a8" and fast.prefill == "w8a8" and fast.weight is dense.weight
    w = pieces["weight"].double()
    sw = pieces["scales"].double()
    for rows in (9, 40):
        x = torch.randn(rows, 512, generator=g).bfloat16()
        x[rows // 2, 100] = 12.0  # one outlier column
        xq, sx, cols = native.q8_quantize(x, kernels.OUTLIER_LIMIT)
        assert cols.tolist() == [100]
        exact = sw * (xq.double() @ w.T * sx.double()[:, None] + x.double()[:, cols] @ w[:, cols].T) + linear.bias.double()
        got = fast(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 2052)
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
        # and it is a product of x: within the inputs' 8-bit rounding of the 16-bit path's result
        ref = x.double() @ (w * sw[:, None]).T + linear.bias.double()
        assert ((got.double() - ref).abs() <= (sx.double()[:, None] / 2).expand(rows, 512) @ (w * sw[:, None]).abs().T
                + ref.abs() * 2 ** -7 + 1e-3).all()
    x = torch.randn(3, 512, generator=g).bfloat16()
    assert torch.equal(fast(x), dense(x))  # decode-sized: the same kernel
    x = torch.randn(20, 512, generator=g).bfloat16()
    x[0, :40] = 7.0  # 40 of 512 columns: more than 1/16
    assert torch.equal(fast(x), dense(x))
    assert fast.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("method, group, levels", QUANTIZED)
def test_fused_quantized_layers_compute_the_per_linear_kernels(native_lib, method, group, levels):
    """native.Layers over int8/int4 Linears against model/fuyu.py's Block calling the same kernels
    one Linear at a time: the same products and roundings, in one call."""
    g = torch.Generator().manual_seed(7)
    cfg = FuyuConfig.tiny(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2)
    blocks = [Block(cfg) for _ in range(2)]
    with torch.no_grad():
        for p in (p for b in blocks for p in b.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    blocks = [b.bfloat16().requires_grad_(False) for b in blocks]
    for b in blocks:
        for name in ("self_attn.query_key_value", "self_attn.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            parent, _, leaf = name.rpartition(".")
            setattr(b.get_submodule(parent), leaf, quantized(b.get_submodule(name), method, group, levels)[0])
    B, S, at = 3, 40, 30
    cache = KVCache(2, B, 4, S, 64, cfg.rotary_dim, cfg.rope_theta, "cpu", torch.bfloat16)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.valid[:, :at] = True
    cache.next_position[:] = at
    cache.length = at
    cache.start_decoding()
    positions = cache.step()
    window = cache.window(1)
    cos, sin = cache.rotary(positions)
    x = torch.randn(B, 1, 256, generator=g)
    k, v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    layers = native.Layers.build([kernels.layer_spec(b) for b in blocks], k, v, cfg.layer_norm_eps, 512)
    assert layers is not None
    ours = layers(x, cos.contiguous(), sin.contiguous(), window.slots, window.mask)
    h = x
    with torch.inference_mode():
        for i, block in enumerate(blocks):
            h = block(h, cos, sin, cache.layer(i, window))
    assert (ours - h).abs().max() <= h.abs().max() * 2 ** -6
    assert (ours - h).abs().mean() <= h.abs().mean() * 2 ** -9
    for a, b in zip((*k, *v), (*cache.k, *cache.v)):
        assert (a.float() - b.float()).abs().max() <= b.float().abs().max() * 2 ** -6


MARCHES = {"x86-64-v3": "AVX2, no AVX-512", "x86-64": "no vector integers: the values one at a time"}


@needs_cc
@pytest.mark.slow
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 targets")
def test_every_instruction_set_computes_the_same_products(native_lib, tmp_path):
    """The kernels built for other x86-64 targets than this CPU (isa.h's AVX2 and plain-C paths;
    AVX-512 and its bf16 dot product where this CPU has them) agree with this machine's build:
    the quantized products are the same integers, summed in another order; the 16-bit ones float32
    sums in another order. Outputs within one bfloat16 rounding."""
    import ctypes

    g = torch.Generator().manual_seed(11)
    N, K = 136, 512
    dense = torch.randn(N, K, generator=g) / 20
    bias = torch.randn(N, generator=g).bfloat16()
    weights = {"PLAIN": native.Weight("PLAIN", dense.bfloat16(), None, bias, N, K)}
    for method, group, levels in QUANTIZED:
        lin = torch.nn.Linear(K, N).bfloat16().requires_grad_(False)
        lin.weight.copy_(dense.bfloat16())
        lin.bias.copy_(bias)
        weights[f"{method}/{group}/{levels}"] = quantized(lin, method, group, levels)[0].spec()
    x = torch.randn(8, K, generator=g).bfloat16()
    want = {name: {B: native.linear(x[:B], w) for B in (1, 3, 8)} for name, w in weights.items()}
    for march in MARCHES:
        path = tmp_path / f"native-{march}.so"
        built = build.build(path, CC, march=march)
        assert built.ok, built.output
        lib = build.bind(ctypes.CDLL(str(path)))
        for name, w in weights.items():
            for B, y in want[name].items():
                got = native.linear(x[:B], w, lib=lib)
                assert ((got.float() - y.float()).abs() <= y.float().abs() * 2 ** -7 + 1e-3).all(), (march, name, B)


@pytest.mark.parametrize("B, H, T, d, start, padded", [(1, 4, 37, 64, 0, False), (2, 3, 40, 32, 0, True),
                                                       (2, 2, 33, 128, 9, False), (1, 2, 20, 64, 5, True)])
def test_flash_prefill_attention_is_as_close_to_float32_as_sdpa(native_lib, B, H, T, d, start, padded):
    """native.flash (bf16 prefill attention in C) over a cache view: causal (no mask), a causal
    mask after a prefix, and left-padded rows; no further from float32 attention than SDPA's own
    bf16 kernel, and within bf16's rounding of it. Without AVX512_BF16 it is not served (None)."""
    g = torch.Generator().manual_seed(T)
    n = start + T
    kc, vc = (torch.randn(B, H, n + 7, d, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(B, H, T, d, generator=g).bfloat16()
    k, v = kc[:, :, :n], vc[:, :, :n]
    mask = None
    if padded or start:
        slots, mine = torch.arange(n), torch.arange(start, n)[:, None]
        valid = torch.rand(B, n, generator=g) < (0.8 if padded else 2)
        mask = (((slots <= mine) & valid[:, None, None, :]) | (slots == mine)).contiguous()
    ours = native.flash(q, k, v, mask, start)
    if ours is None:
        assert "avx512_bf16" not in build.cpu_flags().split()
        return
    ours = ours.view(B, T, H, d).transpose(1, 2).float()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).float()
    truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None)
    assert (ours - truth).abs().max() <= 1.5 * (sdpa - truth).abs().max()
    assert (ours - truth).abs().mean() <= 1.1 * (sdpa - truth).abs().mean()
    assert (ours - truth).abs().max() <= truth.abs().max() * 2 ** -7
