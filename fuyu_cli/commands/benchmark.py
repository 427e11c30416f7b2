"""`fuyu benchmark`: load, preprocessing, prefill, decode and a caption run; optionally vs the reference."""

from __future__ import annotations

import json
from statistics import median
from typing import Annotated, Optional

import typer

from fuyu.options import DeviceOpt, Dtype, DtypeOpt, ModelOpt

EXAMPLES = """[b]Examples[/b]

  fuyu benchmark --random mid                    [dim]# no weights needed[/dim]
  fuyu benchmark --model ~/fuyu-8b --compare reference --repeats 5
  fuyu benchmark --random 8b --device cuda --compile
"""
CAPTION = "Generate a coco-style caption.\n"


def benchmark(
    model: ModelOpt = None,
    random: Annotated[Optional[str], typer.Option(
        help="Random weights of a named size instead of a checkpoint: tiny, mid or 8b.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    batch_sizes: Annotated[str, typer.Option(help="Decode batch sizes, comma-separated.")] = "1,4,16",
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed per run.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs after one warm-up.")] = 3,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step.")] = False,
    compare: Annotated[Optional[str], typer.Option(
        help="'reference': also time transformers 4.57.6 on the same inputs and print ratios.")] = None,
) -> None:
    """Measure speed and memory: Rich table on stderr, one JSON line on stdout."""
    import torch

    from fuyu import bench
    from fuyu.errors import FuyuError
    from fuyu.render import benchmark_table, stderr_console
    from fuyu.runner import resolve_device, resolve_dtype

    if (model is None) == (random is None):
        raise typer.BadParameter("give exactly one of --model DIR or --random tiny|mid|8b")
    if random is not None and random not in bench.SIZES:
        raise typer.BadParameter(f"--random {random}: use one of {', '.join(bench.SIZES)}")
    if compare not in (None, "reference"):
        raise typer.BadParameter("--compare takes 'reference'")
    if compare and model is None:
        raise FuyuError("--compare reference needs --model DIR (the reference loads it from disk)",
                        "write a checkpoint with `fuyu convert` or point --model at one")
    dev = torch.device(resolve_device(device))
    dt = getattr(torch, resolve_dtype(dtype.value, dev.type))
    console = stderr_console()
    sizes = [int(b) for b in batch_sizes.split(",")]
    res: dict = {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "model": str(model or random)}

    start = bench.time.perf_counter()
    net, proc = bench.load(model, random or "", dev, dt)
    load_s = bench.time.perf_counter() - start
    res["load_s"] = round(load_s, 3)

    photo, shot = bench.test_image(640, 480), bench.test_image(1920, 1080, seed=1)
    for name, img in (("1920x1080", shot), ("640x480", photo)):
        res[f"preprocess_ms_{name}"] = round(bench.timed(lambda: proc.prepare_one(img, CAPTION), repeats, dev).median * 1e3, 2)

    one = proc(images=[photo], prompts=[CAPTION])
    T = one.input_ids.shape[1]
    kw = dict(eos_id=-1, compile=compile)
    # Prefill: the forward over the prompt (compute-bound), against plain F.linear doing its GEMMs.
    gemms, gemm_flops = bench.gemm_work(net.config, T, dev, dt)
    t = bench.rounds({"gemm": gemms, "prefill": lambda: bench.prefill(net, one)}, repeats, dev)
    flops = bench.prefill_flops(net.config, T, one.image_patches.shape[0])
    matmul = [gemm_flops / s / 1e12 for s in t["gemm"]]
    achieved = [flops / s / 1e12 for s in t["prefill"]]
    prefill = bench.Stat.of(t["prefill"])
    res["matmul_tflops"] = round(median(matmul), 3)
    res["prefill"] = dict(tokens=T, ms=_ms(prefill), tokens_per_s=round(T / prefill.median),
                          tflops=round(median(achieved), 3),
                          fraction_of_matmul=round(median(a / m for a, m in zip(achieved, matmul)), 3))
    # Time to first token: preprocessing, prefill, LM head on the last position and sampling.
    first = bench.timed(lambda: bench.run_ours(net, proc, [photo], CAPTION, 1, **kw), repeats, dev)
    res["first_token_ms"] = _ms(first)

    # Decode: a step's time is (N + 1 tokens) − (1 token) on the same batch, round by round, each
    # round also reading as many bytes as its N steps read, for the bandwidth to compare with.
    res["decode"], read_rates = {}, []
    weight_bytes = bench.decode_bytes(net)
    read, read_bytes = bench.stream_read(dev, new_tokens * weight_bytes)
    for B in sizes:
        batch = proc(images=[photo] * B, prompts=[CAPTION] * B)
        t = bench.rounds({"read": read, "first": lambda: bench.generate_on(net, batch, 1, **kw),
                          "full": lambda: bench.generate_on(net, batch, new_tokens + 1, **kw)}, repeats, dev)
        steps = [(full - first) / new_tokens for full, first in zip(t["full"], t["first"])]
        rates = [read_bytes / s / 1e9 for s in t["read"]]
        read_rates += rates
        step = bench.Stat.of(steps)
        res["decode"][B] = dict(ms_per_step=_ms(step), tokens_per_s=round(B / step.median, 1),
                                weight_gbs=round(weight_bytes / step.median / 1e9, 1),
                                read_gbs=round(median(rates), 1),  # in the same rounds
                                fraction_of_bandwidth=round(median(weight_bytes / s / 1e9 / r
                                                                   for s, r in zip(steps, rates)), 3))
    del read
    res["bandwidth_gbs"] = round(median(read_rates), 1)

    folder = bench.tmpdir()
    files = bench.caption_files(folder)
    groups = bench.group_by_size(files)  # as the caption command batches: same size together
    caption_run = bench.timed(lambda: [bench.run_ours(net, proc, g, CAPTION, 20, **kw) for g in groups],
                              repeats, dev)
    res["caption_images_per_s"] = round(len(files) / caption_run.median, 3)

    if compare:
        res["reference"] = _reference_module().compare_reference(model, net, proc, dt, dev, photo, files, CAPTION, repeats)
    res.update(bench.peak_memory(dev))
    benchmark_table(console, res)
    typer.echo(json.dumps(res))


def _reference_module():
    """benchmarks/reference_compare.py from the source checkout: transformers (the test oracle)
    is never imported by the fuyu package itself."""
    import importlib.util
    from pathlib import Path

    from fuyu.errors import FuyuError

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_compare.py"
    if not path.is_file():
        raise FuyuError("--compare reference runs from a source checkout (benchmarks/ not found)",
                        "git clone the repository and pip install -e '.[test]'")
    spec = importlib.util.spec_from_file_location("fuyu_reference_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ms(s) -> dict:
    return {"min": round(s.min * 1e3, 2), "median": round(s.median * 1e3, 2), "max": round(s.max * 1e3, 2)}


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(benchmark)
