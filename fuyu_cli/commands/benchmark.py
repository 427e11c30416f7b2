"""`fuyu benchmark`: load, preprocessing, prefill, decode and a caption run; optionally vs the reference."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from fuyu.options import DeviceOpt, Dtype, DtypeOpt, ModelOpt, ThreadsOpt

EXAMPLES = """[b]Examples[/b]

  fuyu benchmark --random mid                    [dim]# no weights needed[/dim]
  fuyu benchmark --model ~/fuyu-8b --compare reference --repeats 5
  fuyu benchmark --random 8b --device cuda --compile
"""


def benchmark(
    model: ModelOpt = None,
    random: Annotated[Optional[str], typer.Option(
        metavar="tiny|mid|8b", help="Random weights of a named size instead of a checkpoint: tiny, mid or 8b.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    threads: ThreadsOpt = None,
    quantize: Annotated[Optional[str], typer.Option(
        metavar="int8|int4|8bit|nf4", help="Quantize the weights as they load, as the other commands do.")] = None,
    quantize_head: Annotated[bool, typer.Option(
        "--quantize-head", help="With --quantize: the LM head quantized too, as the other commands do.")] = False,
    batch_sizes: Annotated[Optional[str], typer.Option(
        metavar="N,N,…", help="Decode batch sizes, comma-separated. Default 1,4,16; 1 at real size "
                              "(Fuyu-8B: a decode step reads 16.6 GB).")] = None,
    new_tokens: Annotated[int, typer.Option(metavar="N", help="Decode steps timed per run.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help="Timed runs after one warm-up.")] = 3,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step.")] = False,
    compare: Annotated[Optional[str], typer.Option(
        metavar="reference", help="'reference': also time transformers 4.57.6 on the same inputs and print ratios.")] = None,
) -> None:
    """Measure speed and memory: Rich table on stderr, one JSON line on stdout.

    At real size (Fuyu-8B) it reports load time, peak RSS, prefill of a 640×480 image and a
    1280×720 screenshot against the GEMM rate, decode ms/token against the streaming read rate and
    the KV cache bytes per token, in a few minutes a dtype on a 2-core CPU."""
    import time

    if (model is None) == (random is None):
        raise typer.BadParameter("give exactly one of --model DIR or --random tiny|mid|8b")
    if compare not in (None, "reference"):
        raise typer.BadParameter("--compare takes 'reference'")

    import torch

    from fuyu import threads as cpu_threads
    from fuyu.benchmarks import arithmetic, suite, workloads
    from fuyu.errors import FuyuError
    from fuyu.render import benchmark_table, stderr_console
    from fuyu.runner import resolve_device, resolve_dtype

    if random is not None and random not in workloads.SIZES:
        raise typer.BadParameter(f"--random {random}: use one of {', '.join(workloads.SIZES)}")
    if compare and model is None:
        raise FuyuError("--compare reference needs --model DIR (the reference loads it from disk)",
                        "write a checkpoint with `fuyu convert` or point --model at one")
    n_threads = cpu_threads.configure(threads)
    if model is not None:
        from fuyu.locate import find_checkpoint

        model = find_checkpoint(model)
    dev = torch.device(resolve_device(device))
    dt = getattr(torch, resolve_dtype(dtype.value, dev.type))
    console = stderr_console()
    res: dict = {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "model": str(model or random),
                 "threads": n_threads}
    quantization = quantize
    if quantize is not None:
        res["quantize"] = quantize + ("+head" if quantize_head else "")
        if quantize_head:
            quantization = {"method": quantize, "skip": ["vision_embed_tokens"]}
    elif quantize_head:
        raise typer.BadParameter("--quantize-head goes with --quantize")
    config = None  # read once: the memory check and the loader share it
    if model is not None and dev.type in ("cpu", "cuda"):
        from fuyu import memory
        from fuyu.model.weights import read_config

        config = read_config(model)
        memory.check_fit(model, str(model), config, res["dtype"], quantize, new_tokens, str(dev))
    start = time.perf_counter()
    net, proc = workloads.load(model, random or "", dev, dt, quantization, config)  # load_pretrained + the kernel step
    res["load_s"] = round(time.perf_counter() - start, 3)
    res["load_peak_rss_gb"] = workloads.peak_memory(dev)["peak_rss_gb"]
    res["plan"] = suite.kernel_plan(net)
    real = arithmetic.decode_bytes(net) >= suite.REAL_SIZE_BYTES
    sizes = [int(b) for b in (batch_sizes or ("1" if real else "1,4,16")).split(",")]
    res.update((suite.run_real if real else suite.run)(net, proc, dev, sizes, new_tokens, repeats, compile))
    files = res.pop("caption_files", None)
    if compare and files is None:
        raise FuyuError("--compare reference runs at the quick sizes only (mid, tiny)",
                        "compare at real size with benchmarks/reference_compare.py in alternating processes")
    if compare:
        from fuyu.benchmarks.reference_compare import compare_reference

        res["reference"] = compare_reference(model, net, proc, dt, dev, workloads.test_image(640, 480),
                                             files, suite.CAPTION, repeats)
    res.update(workloads.peak_memory(dev))
    benchmark_table(console, res)
    for line in plan_lines(res["plan"]):
        console.print(line, markup=False, highlight=False)
    typer.echo(json.dumps(res))


def plan_lines(report: dict) -> list[str]:
    """The kernel plan chosen, then per part each candidate's timings (decode ms a step at 1, 2
    and 8 rows, per layer for the layers, and the layers' 512-row prefill), the chosen one first."""
    if not report:
        return []
    lines = [f"kernel plan: layers {report['layers']}, head {report['head']} ({report['how']}"
             + (", every layer in one native call a decode step" if report["fused"] else "") + ")"]
    for part, timed in report["timings"].items():
        for kernel, t in sorted(timed.items(), key=lambda kv: kv[1]["score"]):
            ms = "/".join("-" if v is None else f"{v:.3g}" for v in t["ms"])
            mark = "chosen" if kernel == report[part] else "beaten"
            lines.append(f"  {part:6} {kernel:>12}  {mark}  score {t['score']:.4g}  (ms at 1/2/8 rows/prefill: {ms})")
    return lines


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(benchmark)
