"""The GPU check (issue 10 item 4): one script, one JSON file of results.

    python -m fuyu.benchmarks.device_check RESULTS.json [--budget-s 420]

On a CUDA machine (about 5 minutes on an H200, installs not counted):
  parity    float32 logits and greedy ids of ours (eager and compile=True) against the reference
            (transformers 4.57.6) on tiny random checkpoints, on the GPU;
  bnb       bitsandbytes 8-bit and 4-bit (nf4) loading and generation, logits against bf16;
  full      a full-size Fuyu-8B with random weights in bf16: decode at batch 1 and 8 as a fraction
            of the HBM bandwidth measured alongside (a big copy and a big sum), prefill of one
            1920×1080 screenshot (2,340 image tokens) against the GEMM rate;
  compile   the decode step under torch.compile with CUDA graphs against eager, same batches.
Without CUDA the same sections run reduced (tiny model) on the CPU: a test runs it in CI.

Each section records its numbers or its error and the file is rewritten after each one, so a
section that fails or a run stopped at its time limit still leaves the rest. The device machine's
recipe (the wheels it lacks, the one-line command) is in benchmarks/DEVICE.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fuyu.benchmarks import arithmetic
from fuyu.model import Fuyu, FuyuConfig, generate, load_pretrained, logits, prefill
from fuyu.model.generate import cache_room, stepper
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import PLAIN_IDS, make_checkpoint

FUYU_IDS = dict(pad=0, bos=1, speaker=71011, newline=71019, eos=71013, boa=71122)  # the hub tokenizer's special ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up call, synchronised."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return statistics.median(out)


# --- parity --------------------------------------------------------------------------------------

def parity(device: torch.device, work: Path, full: bool) -> dict:
    import transformers

    configs = {"h64-hub-single": dict(hidden=64, heads=4, layers=2, layout="hub", shards=1),
               "h96-module-sharded": dict(hidden=96, heads=6, layers=3, layout="module", shards=3)}
    if not full:
        configs.pop("h96-module-sharded")
    cases = {"one image": [(3, 4, 6)], "left-padded": [(4, 5, 3), (2, 3, 7), (1, 6, 2)], "text only": [(0, 0, 9)]}
    out: dict = {"transformers": transformers.__version__}
    for name, kw in configs.items():
        ckpt = make_checkpoint(work / name, vocab_size=300, tokenizer=False, seed=kw["hidden"], **kw)
        ours = load_pretrained(ckpt, device=device, dtype=torch.float32)
        ref = transformers.FuyuForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                           attn_implementation="eager").to(device).eval()
        for case, shapes in cases.items():
            batch = make_batch(shapes, 300, seed=11)
            patches = [p.to(device) for p in batch.per_sample_patches] if batch.per_sample_patches else None
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            with torch.no_grad():
                got = logits(ours, batch)
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                want = ref(input_ids=ids, attention_mask=mask, image_patches=patches, position_ids=pos).logits
                ref_ids = ref.generate(input_ids=ids, attention_mask=mask, image_patches=patches, max_new_tokens=24,
                                       do_sample=False, pad_token_id=ours.config.eos_token_id)[:, ids.shape[1]:]
            real = mask.bool()
            eager = generate(ours, batch, 24)
            row = out[f"{name} / {case}"] = {"max_abs_logit_diff": (got[real] - want[real]).abs().max().item(),
                                             "greedy_equal_eager": eager.tolist() == ref_ids.tolist()}
            if name == "h64-hub-single" and (full or case == "one image"):  # compiles take time: a few suffice
                row["greedy_equal_compiled"] = generate(ours, batch, 24, compile=True).tolist() == ref_ids.tolist()
    rows = [v for v in out.values() if isinstance(v, dict)]
    out["ok"] = all(r["max_abs_logit_diff"] < 1e-4 and r["greedy_equal_eager"] and r.get("greedy_equal_compiled", True)
                    for r in rows)
    return out


# --- bitsandbytes --------------------------------------------------------------------------------

def bnb(device: torch.device, work: Path, full: bool) -> dict:
    import bitsandbytes

    hidden, layers = (512, 4) if full else (128, 2)
    ckpt = make_checkpoint(work / "bnb", hidden=hidden, heads=hidden // 64, layers=layers, vocab_size=4096,
                           tokenizer=False, seed=3)
    batch = make_batch([(4, 6, 12), (2, 3, 5)], 4096, seed=1)
    base = load_pretrained(ckpt, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = logits(base, batch).float()
    want_ids = generate(base, batch, 16, eos_id=-1)
    out: dict = {"bitsandbytes": bitsandbytes.__version__, "hidden": hidden, "layers": layers}
    for method in ("8bit", "4bit"):
        start = time.perf_counter()
        model = load_pretrained(ckpt, device=device, quantization=method)
        load_s = time.perf_counter() - start
        kinds = sorted({type(m).__name__ for m in model.layers.modules() if "Linear" in type(m).__name__})
        with torch.no_grad():
            got = logits(model, batch).float()
        ids = generate(model, batch, 16, eos_id=-1)
        step = seconds(lambda: generate(model, batch, 9, eos_id=-1), device, 3 if full else 1)
        first = seconds(lambda: generate(model, batch, 1, eos_id=-1), device, 3 if full else 1)
        out[method] = {"load_s": round(load_s, 3), "layer_modules": kinds,
                       "max_abs_logit_diff_vs_bf16": round((got - want).abs().max().item(), 4),
                       "mean_abs_logit_diff_vs_bf16": round((got - want).abs().mean().item(), 5),
                       "greedy_agreement_vs_bf16": round((ids == want_ids).float().mean().item(), 3),
                       "decode_ms_per_step_batch2": round((step - first) / 8 * 1e3, 3)}
    return out


# --- full-size model ----------------------------------------------------------------------------

def random_model(cfg: FuyuConfig, device: torch.device, dtype: torch.dtype) -> Fuyu:
    """Random weights made on the host a block at a time and placed on the device, as
    load_pretrained places a checkpoint's (no float32 copy, no second copy on the way)."""
    from fuyu.model.weights import build
    from fuyu.testing.checkpoint import random_tensors

    return build(cfg, random_tensors(cfg), device, dtype, where="random weights")


def batch_plan(model: Fuyu, device: torch.device, tokens: int, most: int) -> dict:
    """The largest decode batch (≤ most) whose KV cache and prefill activations fit in the
    device's free memory now (torch.cuda.mem_get_info; the host's on CPU), as the CLI plans it."""
    from fuyu.model import memory

    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    room = memory.device_available(device)
    rows = memory.rows_that_fit(model.config, room, 0, tokens, dtype, most, runtime=0)  # weights loaded
    return {"free_gb": None if room is None else round(room / 1e9, 2), "tokens_per_row": tokens,
            "kv_bytes_per_token": memory.kv_bytes(model.config, 1, 1, dtype), "asked": most, "chosen": rows}


def memory_rates(device: torch.device, nbytes: int) -> dict:
    """GB/s of a big device copy (bytes read + written) and a big sum (bytes read)."""
    x = torch.ones(nbytes // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy = seconds(lambda: y.copy_(x), device, 5)
    total = seconds(lambda: x.sum(), device, 5)
    return {"copy_gbs": round(2 * nbytes / copy / 1e9, 1), "sum_gbs": round(nbytes / total / 1e9, 1)}


def decode_rate(model: Fuyu, batch, steps: int, device: torch.device, compile: bool) -> dict:
    """ms per decode step after prefill, eager or compiled; the compiled step's first call is timed apart."""
    T = batch["input_ids"].shape[1]
    with torch.inference_mode():  # the cache size generate(compile=True) uses: its compiled step serves both
        cache, last = prefill(model, batch, cache_room(T, steps + 4))
        step = stepper(cache, compile)
        ids = last.argmax(-1)
        sync(device)
        start = time.perf_counter()
        ids = step(model, cache, ids).argmax(-1)  # compiles (and records the graph) when compiling
        sync(device)
        first_s = time.perf_counter() - start
        for _ in range(2):
            ids = step(model, cache, ids).argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            ids = step(model, cache, ids).argmax(-1)
        sync(device)
        per_step = (time.perf_counter() - start) / steps
    return {"ms_per_step": round(per_step * 1e3, 3), "first_step_s": round(first_s, 2),
            "kv_cache_gb": round(cache.bytes() / 1e9, 3)}


def full_config(full: bool) -> tuple[FuyuConfig, dict]:
    """Fuyu-8B's config and token ids, or (reduced) a tiny model's."""
    if full:
        return FuyuConfig(), FUYU_IDS
    return FuyuConfig.tiny(vocab_size=2048, eos_token_id=PLAIN_IDS["eos"], image_token_id=PLAIN_IDS["speaker"]), PLAIN_IDS


def photo_batch(cfg: FuyuConfig, B: int, ids: dict, device: torch.device) -> dict:
    """B rows of a 640×480 image (16 × 22 patches) and a short prompt, on the device."""
    batch = make_batch([(16, 22, 10)] * B, cfg.vocab_size, seed=B, ids=ids)
    return dict(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                image_patches=batch.image_patches.to(device))


def full(device: torch.device, work: Path, full: bool) -> dict:
    """Full-size Fuyu-8B (or, reduced, a tiny one): decode at batch 1 and 8, prefill of a 1920×1080 screenshot."""
    cfg, ids = full_config(full)
    rows_cols, steps, batches = ((36, 64), 32, (1, 8)) if full else ((6, 8), 8, (1, 2))
    dtype = torch.bfloat16
    model = random_model(cfg, device, dtype)
    weight_bytes = arithmetic.decode_bytes(model)
    out: dict = {"config": "fuyu-8b" if full else "tiny", "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                 "decode_weight_gb": round(weight_bytes / 1e9, 3)}
    out["memory"] = memory_rates(device, (4 << 30) if full else (256 << 20))
    hbm = out["memory"]["sum_gbs"]
    plan = batch_plan(model, device, 16 * 23 + 12 + steps + 4, max(batches))
    out["plan"] = plan
    for B in sorted({min(B, plan["chosen"]) for B in batches} - {0}):
        batch = photo_batch(cfg, B, ids, device)
        # reduced: the compiled step at batch 1 only (a compile costs ~15 s on a CPU)
        modes = {"eager": False, "compiled": True} if full or B == 1 else {"eager": False}
        for mode, flag in modes.items():
            r = decode_rate(model, batch, steps, device, flag)
            kv_read = r["kv_cache_gb"] * 1e9 * (batch["input_ids"].shape[1] / (batch["input_ids"].shape[1] + steps + 4))
            r["weight_gbs"] = round(weight_bytes / r["ms_per_step"] * 1e3 / 1e9, 1)
            r["fraction_of_hbm_weights"] = round(weight_bytes / (r["ms_per_step"] / 1e3) / 1e9 / hbm, 3)
            r["fraction_of_hbm_weights_and_kv"] = round((weight_bytes + kv_read) / (r["ms_per_step"] / 1e3) / 1e9 / hbm, 3)
            r["tokens_per_s"] = round(B / r["ms_per_step"] * 1e3, 1)
            out[f"decode_batch{B}_{mode}"] = r
        if "compiled" in modes:
            with torch.inference_mode():
                a = generate(model, batch, 16, eos_id=-1)
                b = generate(model, batch, 16, eos_id=-1, compile=True)
            out[f"decode_batch{B}_compiled_vs_eager_same_ids"] = round((a == b).float().mean().item(), 3)
            out[f"decode_batch{B}_ids"] = {"eager": a.tolist(), "compiled": b.tolist()}
    rows, cols = rows_cols
    shot = make_batch([(rows, cols, 10)], cfg.vocab_size, seed=0, ids=ids)
    T = shot.input_ids.shape[1]
    shot = dict(input_ids=shot.input_ids.to(device), attention_mask=shot.attention_mask.to(device),
                image_patches=shot.image_patches.to(device))
    with torch.inference_mode():
        pre = seconds(lambda: prefill(model, shot), device, 3)
        gemms, gemm_flops = arithmetic.gemm_work(cfg, T, device, dtype)
        gemm = seconds(gemms, device, 3)
    flops = arithmetic.prefill_flops(cfg, T, rows * cols)
    out["prefill_1920x1080"] = {"tokens": T, "ms": round(pre * 1e3, 2), "tflops": round(flops / pre / 1e12, 1),
                                "gemm_tflops": round(gemm_flops / gemm / 1e12, 1),
                                "fraction_of_gemm": round(flops / pre / (gemm_flops / gemm), 3)}
    del model
    if device.type == "cuda":
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        torch.cuda.empty_cache()
    return out


SECTIONS = {"parity": parity, "bnb": bnb, "full": full}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the JSON file of results")
    ap.add_argument("--budget-s", type=float, default=420, help="skip sections once this much time has passed")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run, comma-separated")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                     "reduced": not cuda, "torch": torch.__version__, "python": platform.python_version(),
                     "sections": {}}
    if not cuda:
        from fuyu.model.native.build import cpu_model

        results["device"] = cpu_model()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fuyu-device-check-"))
    for name in args.only.split(","):
        if time.perf_counter() - start > args.budget_s:
            results["sections"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        t = time.perf_counter()
        try:
            section = SECTIONS[name](device, work, cuda)
        except Exception as exc:  # record it and go on: the other sections still tell something
            section = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        section["seconds"] = round(time.perf_counter() - t, 1)
        results["sections"][name] = section
        results["seconds"] = round(time.perf_counter() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(section)[:400]}", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    main()
