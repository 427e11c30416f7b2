"""`fuyu benchmark`: load, preprocessing, prefill, decode and a caption run; optionally vs the reference."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from fuyu_cli.options import DeviceOpt, Dtype, DtypeOpt, ModelOpt

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

    from fuyu_cli import bench
    from fuyu_cli.errors import FuyuError
    from fuyu_cli.render import benchmark_table, stderr_console
    from fuyu_cli.runner import resolve_device, resolve_dtype

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
    res["bandwidth_gbs"] = round(bench.bandwidth(dev), 1)

    photo, shot = bench.test_image(640, 480), bench.test_image(1920, 1080, seed=1)
    for name, img in (("1920x1080", shot), ("640x480", photo)):
        res[f"preprocess_ms_{name}"] = round(bench.timed(lambda: proc.prepare_one(img, CAPTION), repeats, dev).median * 1e3, 2)

    one = proc(images=[photo], prompts=[CAPTION])
    T = one.input_ids.shape[1]
    kw = dict(eos_id=-1, compile=compile)
    # Prefill: the forward over the prompt (compute-bound), against plain F.linear on its own GEMM shapes.
    res["matmul_tflops"] = round(bench.matmul_tflops(dev, dt, bench.layer_gemms(net.config, T)), 3)
    prefill = bench.timed(lambda: bench.prefill(net, one), repeats, dev)
    flops = bench.prefill_flops(net.config, T, one.image_patches.shape[0])
    res["prefill"] = dict(tokens=T, ms=_ms(prefill), tokens_per_s=round(T / prefill.median),
                          tflops=round(flops / prefill.median / 1e12, 3))
    res["prefill"]["fraction_of_matmul"] = round(res["prefill"]["tflops"] / res["matmul_tflops"], 3)
    # Time to first token: preprocessing, prefill, LM head on the last position and sampling.
    first = bench.timed(lambda: bench.run_ours(net, proc, [photo], CAPTION, 1, **kw), repeats, dev)
    res["first_token_ms"] = _ms(first)

    res["decode"] = {}
    for B in sizes:  # a step's time: (N + 1 tokens) − (1 token) on the same batch, fastest of the repeats
        batch = proc(images=[photo] * B, prompts=[CAPTION] * B)
        full = bench.timed(lambda: bench.generate_on(net, batch, new_tokens + 1, **kw), repeats, dev)
        first = bench.timed(lambda: bench.generate_on(net, batch, 1, **kw), repeats, dev)
        step = (full.min - first.min) / new_tokens
        gbs = bench.decode_bytes(net) / step / 1e9
        res["decode"][B] = dict(ms_per_step=round(step * 1e3, 2), tokens_per_s=round(B / step, 1),
                                weight_gbs=round(gbs, 1), fraction_of_bandwidth=round(gbs / res["bandwidth_gbs"], 3))

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
    is never imported by the fuyu_cli package itself."""
    import importlib.util
    from pathlib import Path

    from fuyu_cli.errors import FuyuError

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_compare.py"
    if not path.is_file():
        raise FuyuError("--compare reference runs from a source checkout (benchmarks/ not found)",
                        "git clone the repository and pip install -e '.[test]'")
    spec = importlib.util.spec_from_file_location("fuyu_reference_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ms(s) -> dict:
    return {"min": round(s.min * 1e3, 1), "median": round(s.median * 1e3, 1), "max": round(s.max * 1e3, 1)}


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(benchmark)
