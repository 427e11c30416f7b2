"""What `fuyu benchmark` measures: preprocessing, prefill against F.linear, decode against the
memory's read rate, a caption run, and optionally the reference on the same inputs.

Decode: steps after one prefill, each followed by a streaming read of as many bytes as a step
reads; the fraction of the read rate is the median over those pairs (decode_against_read). Prefill: the
forward over the prompt against plain F.linear doing its GEMMs, in alternating rounds.

A model at real size (Fuyu-8B: a decode step reads 16.6 GB, a 640×480 prefill is ~7 TFLOP) gets
`run_real` instead, which fits one run in minutes on a 2-core CPU: one prefill per timed round
for a 640×480 image and a 1280×720 screenshot against one layer's GEMMs (times the layer count),
decode steps as above, and no caption run.
"""

from __future__ import annotations

from statistics import median

import torch

from fuyu.benchmarks import arithmetic, workloads

CAPTION = "Generate a coco-style caption.\n"


def run(net, proc, device: torch.device, sizes: list[int], new_tokens: int, repeats: int,
        compile: bool = False) -> dict:
    res: dict = {}
    photo, shot = workloads.test_image(640, 480), workloads.test_image(1920, 1080, seed=1)
    for name, img in (("1920x1080", shot), ("640x480", photo)):
        t = workloads.timed(lambda: proc.prepare_one(img, CAPTION), repeats, device)
        res[f"preprocess_ms_{name}"] = round(t.median * 1e3, 2)

    one = proc(images=[photo], prompts=[CAPTION])
    T = one.input_ids.shape[1]
    kw = dict(eos_id=-1, compile=compile)
    dtype = net.embed_tokens.weight.dtype
    gemms, gemm_flops = arithmetic.gemm_work(net.config, T, device, dtype)
    packed, _ = arithmetic.gemm_work(net.config, T, device, dtype, packed=True)
    fns = {"gemm": gemms, "prefill": lambda: workloads.prefill(net, one)}
    if packed is not None:
        fns["gemm_packed"] = packed
    t = workloads.rounds(fns, repeats, device)
    flops = arithmetic.prefill_flops(net.config, T, one.image_patches.shape[0])
    fastest = [min(ts) for ts in zip(*(t[k] for k in fns if k.startswith("gemm")))]  # per round
    matmul = [gemm_flops / s / 1e12 for s in fastest]
    achieved = [flops / s / 1e12 for s in t["prefill"]]
    prefill = workloads.Stat.of(t["prefill"])
    res["matmul_tflops"] = round(median(matmul), 3)  # the faster of F.linear and oneDNN packed
    res["prefill"] = dict(tokens=T, ms=ms(prefill), tokens_per_s=round(T / prefill.median),
                          tflops=round(median(achieved), 3),
                          fraction_of_matmul=round(median(a / m for a, m in zip(achieved, matmul)), 3))
    # Time to first token: preprocessing, prefill, LM head on the last position and sampling.
    first = workloads.timed(lambda: workloads.run_ours(net, proc, [photo], CAPTION, 1, **kw), repeats, device)
    res["first_token_ms"] = ms(first)

    res["decode"] = {}
    for B in sizes:
        batch = proc(images=[photo] * B, prompts=[CAPTION] * B)
        res["decode"][B] = decode_against_read(net, batch, device, new_tokens, repeats, compile)
    res["bandwidth_gbs"] = median(d["read_gbs"] for d in res["decode"].values())

    files = workloads.caption_files(workloads.tmpdir())
    groups = workloads.group_by_size(files)  # as `fuyu caption -b 8` batches: each size prefilled
    # alone, all decoded together
    run_all = workloads.timed(lambda: workloads.generate_on(
        net, [proc(images=g, prompts=[CAPTION] * len(g)) for g in groups], 20, **kw), repeats, device)
    res["caption_images_per_s"] = round(len(files) / run_all.median, 3)
    res["caption_files"] = [str(f) for f in files]
    return res


REAL_SIZE_BYTES = 4 << 30  # decode bytes from which a model gets run_real


def decode_against_read(net, batch, device: torch.device, steps: int, repeats: int, compile: bool = False) -> dict:
    """Decode steps of `batch` after one prefill, each step followed by a streaming read of as many
    bytes as the step reads: the read rate is taken in the same seconds as the step it is compared
    with (on these machines it swings 2x within minutes, so rounds of many steps against rounds of
    reads compare different machines). Medians over steps × repeats pairs: ms a step, the read
    rate, and the fraction (the step's weight bytes a second over its own read's rate)."""
    from fuyu.model.generate import prefill, sample, stepper

    weight_bytes = arithmetic.decode_bytes(net)
    read, read_bytes = arithmetic.stream_read(device, weight_bytes)
    step_s, read_s, fraction = [], [], []
    with torch.inference_mode():
        cache, last = prefill(net, batch, steps * repeats + 2)
        step, ids = stepper(cache, compile), sample(last)
        ids = sample(step(net, cache, ids))  # warms up (and compiles)
        read()
        for _ in range(steps * repeats):
            start = _now(device)
            ids = sample(step(net, cache, ids))
            took = _now(device) - start
            start = _now(device)
            read()
            reading = _now(device) - start
            step_s.append(took)
            read_s.append(reading)
            fraction.append(weight_bytes / took / (read_bytes / reading))
        del cache
    st = workloads.Stat.of(step_s)
    B = batch.input_ids.shape[0]
    rate = read_bytes / median(read_s) / 1e9
    return dict(prompt_tokens=batch.input_ids.shape[1], ms_per_step=ms(st), tokens_per_s=round(B / st.median, 2),
                weight_gbs=round(weight_bytes / st.median / 1e9, 1), read_gbs=round(rate, 1),
                fraction_of_bandwidth=round(median(fraction), 3))


def run_real(net, proc, device: torch.device, sizes: list[int], new_tokens: int, repeats: int,
             compile: bool = False) -> dict:
    """The real-size measurements: preprocessing, prefill of two images, decode at each batch
    size (batch 1 after the 640×480 prefill; larger ones after a short prompt of a 90×90 image,
    whose cache costs the step little), KV cache bytes per token."""
    from fuyu.model import KVCache

    cfg, dtype = net.config, net.embed_tokens.weight.dtype
    res: dict = {"real_size": True, "kv_cache_bytes_per_token": KVCache.bytes_per_token(
        cfg.num_hidden_layers, cfg.hidden_size, dtype)}
    photo, shot = workloads.test_image(640, 480), workloads.test_image(1280, 720, seed=1)
    for name, img in (("1920x1080", workloads.test_image(1920, 1080, seed=2)), ("640x480", photo)):
        t = workloads.timed(lambda: proc.prepare_one(img, CAPTION), repeats, device)
        res[f"preprocess_ms_{name}"] = round(t.median * 1e3, 2)
    res["prefill_images"] = {}
    for name, img in (("640x480", photo), ("1280x720", shot)):
        one = proc(images=[img], prompts=[CAPTION])
        T = one.input_ids.shape[1]
        gemms, gemm_flops = arithmetic.gemm_work(cfg, T, device, dtype, layers=1)
        packed, _ = arithmetic.gemm_work(cfg, T, device, dtype, layers=1, packed=True)
        layer = workloads.timed(gemms, repeats, device)  # one layer's four GEMMs, warmed up
        if packed is not None:  # the fastest GEMM torch offers: F.linear or oneDNN's packed
            layer = min(layer, workloads.timed(packed, repeats, device), key=lambda st: st.median)
        t = workloads.rounds({"prefill": lambda: workloads.prefill(net, one)}, repeats, device, warmup=False)
        flops = arithmetic.prefill_flops(cfg, T, one.image_patches.shape[0])
        gemm_rate = gemm_flops / layer.median
        pre = workloads.Stat.of(t["prefill"])
        res["prefill_images"][name] = dict(
            tokens=T, ms=ms(pre), tflops=round(flops / pre.median / 1e12, 3),
            gemm_tflops=round(gemm_rate / 1e12, 3), fraction_of_gemm=round(flops / pre.median / gemm_rate, 3))
    res["decode"] = {}
    small = workloads.test_image(90, 90)
    for B in sizes:
        batch = proc(images=[photo] if B == 1 else [small] * B, prompts=[CAPTION] * B)
        res["decode"][B] = decode_against_read(net, batch, device, new_tokens, repeats, compile)
    res["bandwidth_gbs"] = median(d["read_gbs"] for d in res["decode"].values())
    return res


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def kernel_plan(net) -> dict:
    """The kernel plan the model was loaded with and the timings of the plans it beat
    (fuyu.model.plan.report); empty off the CPU."""
    from fuyu.model import plan

    chosen = getattr(net.backend, "plan", None) if net.backend is not None else None
    return {} if chosen is None else plan.report(net, chosen)


def ms(s) -> dict:
    return {"min": round(s.min * 1e3, 2), "median": round(s.median * 1e3, 2), "max": round(s.max * 1e3, 2)}
