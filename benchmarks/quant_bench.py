"""Quantization schemes on a mid-size random Fuyu (hidden 1024, 8 layers, 16 heads, vocab 262144).

    python -m fuyu.benchmarks.quant_bench [--dir /tmp/quant_bench] [--steps 32] [--repeats 3]

Builds a bf16 checkpoint (sharded by `fuyu convert`) and pre-quantized int8 / nf4 copies, then
loads each scheme in a fresh subprocess and reports: checkpoint size on disk, load time, peak RSS
while loading (VmHWM, reset through /proc/self/clear_refs after the imports, so it covers the load
only; the absolute peak is shown too) and resident memory after one forward (memory-mapped weights
count once touched), logits error vs bf16 on one batch (an image of 4×6 patches
plus 20 text tokens), decode tokens/s at batch 1 (median over repeats, after a warm-up), and
greedy agreement with bf16: teacher-forced over the bf16 continuation (per step, is the argmax
the same?) and the first step where free-running greedy output diverges. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


MID = dict(hidden=1024, heads=16, layers=8, intermediate=4096, vocab_size=262144)
# (row name, checkpoint, quantization passed to load_pretrained)
ROWS = [("bf16", "bf16", None), ("int8", "bf16", "int8"), ("int8 pre-quantized", "int8", None),
        ("int4", "bf16", "int4"), ("8bit (bnb)", "bf16", "8bit"), ("nf4 (bnb)", "bf16", "nf4"),
        ("nf4 pre-quantized", "nf4", None), ("fp4 (bnb)", "bf16", "fp4")]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> None:
    """One scheme in this fresh process: load (peak RSS), logits, teacher-forced argmax, decode speed."""
    import torch

    from fuyu.model import generate, load_pretrained, logits
    from fuyu.testing.batches import make_batch

    torch.manual_seed(0)
    batch = make_batch([(4, 6, 20)], MID["vocab_size"], seed=0)
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the load's
    t = time.perf_counter()
    model = load_pretrained(args.ckpt, quantization=args.quantization)
    load_s = time.perf_counter() - t
    peak = status_kib("VmHWM")
    res = {"load_s": load_s, "rss_base_mb": base / 1024, "rss_peak_mb": peak / 1024,
           "rss_load_mb": (peak - base) / 1024}
    with torch.no_grad():
        out = logits(model, batch)[0].float()  # (T, V)
    # mmap-backed weights become resident when first used: the working set after one forward
    res["rss_used_mb"] = (status_kib("VmRSS") - base) / 1024
    torch.save(out, args.out + ".logits.pt")
    greedy = generate(model, batch, args.steps, eos_id=-1)[0]
    res["greedy"] = greedy.tolist()
    ref_ids = Path(args.ref_ids)
    if ref_ids.is_file():  # teacher forcing on the bf16 continuation: per-step argmax agreement
        ref = torch.tensor(json.loads(ref_ids.read_text()))
        ids = torch.cat([batch.input_ids, ref[None, :-1]], 1)
        forced = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_patches=batch.image_patches)
        with torch.no_grad():
            pred = logits(model, forced)[0, batch.input_ids.shape[1] - 1:].argmax(-1)
        res["forced_agree"] = int((pred == ref).sum())
    times = []
    generate(model, batch, 2, eos_id=-1)  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        generate(model, batch, 1, eos_id=-1)  # prefill + first token
        t1 = time.perf_counter()
        generate(model, batch, args.steps + 1, eos_id=-1)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / args.steps)
    res["decode_tok_s"] = 1 / statistics.median(times)
    Path(args.out).write_text(json.dumps(res))


def build(d: Path) -> dict[str, Path]:
    import torch

    from fuyu.model.convert import convert
    from fuyu.testing.checkpoint import make_checkpoint

    paths = {"bf16": d / "bf16", "int8": d / "int8", "nf4": d / "nf4"}
    if not paths["bf16"].is_dir():
        raw = make_checkpoint(d / "raw", tokenizer=False, dtype=torch.bfloat16, **MID)
        convert(raw, paths["bf16"], shard_size="600MB")
    for method in ("int8", "nf4"):
        if not paths[method].is_dir():
            convert(paths["bf16"], paths[method], quantization=method, shard_size="600MB")
    return paths


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/quant_bench")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--quantization", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ref-ids", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = build(d)
    ref_ids = d / "bf16_greedy.json"
    ref_ids.unlink(missing_ok=True)
    wanted = args.rows.split(",")
    results, ref_logits = {}, None
    for name, ckpt, quant in [r for r in ROWS if r[0] in wanted or r[0] == "bf16"]:
        out = d / f"result-{name.split()[0]}-{ckpt}.json"
        cmd = [sys.executable, "-m", "fuyu.benchmarks.quant_bench", "--worker", "--ckpt", str(paths[ckpt]), "--out", str(out),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--ref-ids", str(ref_ids)]
        if quant:
            cmd += ["--quantization", quant]
        subprocess.run(cmd, check=True)
        res = json.loads(out.read_text())
        logits = torch.load(str(out) + ".logits.pt")
        if ref_logits is None:
            ref_logits = logits
            ref_ids.write_text(json.dumps(res["greedy"]))
        err = (logits - ref_logits).abs()
        same = [a == b for a, b in zip(res["greedy"], json.loads(ref_ids.read_text()))]
        res.update(disk_mb=disk_mb(paths[ckpt]), err_max=err.max().item(), err_mean=err.mean().item(),
                   diverge=same.index(False) if False in same else len(same))
        res.setdefault("forced_agree", len(same))
        res.pop("greedy")
        results[name] = res
        print(f"{name}: {res}", file=sys.stderr)
    print_table(results, args.steps, ref_logits)
    print(json.dumps(results))


def print_table(results: dict, steps: int, ref_logits) -> None:
    print(f"logits: batch of 1 (4x6 image + 20 text tokens), bf16 |logit| mean "
          f"{ref_logits.abs().mean():.2f}, std {ref_logits.std():.2f}; greedy: {steps} steps")
    print("| scheme | on disk (MB) | load (s) | peak RSS loading (MB): load / absolute | "
          "RSS after 1st forward (MB) | max abs err | mean abs err | decode tok/s | "
          "greedy = bf16 (teacher-forced) | free-running identical for |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['disk_mb']:.0f} | {r['load_s']:.1f} | {r['rss_load_mb']:.0f} / "
              f"{r['rss_peak_mb']:.0f} | {r['rss_used_mb']:.0f} | {r['err_max']:.3f} | {r['err_mean']:.4f} | "
              f"{r['decode_tok_s']:.1f} | {r['forced_agree']}/{steps} | {r['diverge']} steps |")


if __name__ == "__main__":
    main()
