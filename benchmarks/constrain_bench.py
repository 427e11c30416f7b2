"""A decode step with a grammar on every row against the same step unconstrained (issue 25).

    python benchmarks/constrain_bench.py [--model DIR] [--batch 1 8] [--steps 24] [--repeats 5]

Without --model, the mid-size random checkpoint (hidden 1024, 8 layers, 262,144 logits over the
tiny tokenizer, bfloat16) is written to a temporary folder first. Each run is fuyu.model.generate
on B copies of one 640×480 image and question, greedy, with scores (logprobs=True, as the CLI
always asks): unconstrained, then with every row under a text-like grammar whose allowed sets
stay large (the run is checked to decode as many steps as the unconstrained one). A step's cost is (time of steps+1 tokens − time of 1
token) / steps, so prefill drops out. Runs alternate; medians. Also the cost of the scores alone
(logprobs=False against True, unconstrained). One JSON line on stdout, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# Text-like and unbounded: outlines-core compiles counted repetitions of such a class slowly
# ({30,40}: 48 s and 2 GB on this machine), `+` at once.
PATTERN = "[A-Za-z0-9 ,.$-]+"


def cpu() -> dict:
    info = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model") and key not in info:
            info[key] = value.strip()
        if key == "flags" and "flags" not in info:
            flags = value.split()
            info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                             if f in flags]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import torch

    from fuyu.benchmarks.workloads import test_image
    from fuyu.fields import Field
    from fuyu.model import generate, load_pretrained
    from fuyu.model.constrain import Vocabulary
    from fuyu.preprocess import FuyuProcessor

    ckpt = args.model
    if ckpt is None:
        from fuyu.testing import make_checkpoint

        ckpt = make_checkpoint(Path(tempfile.mkdtemp(prefix="fuyu-constrain-")) / "mid", hidden=1024, heads=16,
                               layers=8, vocab_size=262144, dtype=torch.bfloat16, shards=2)
    proc = FuyuProcessor.from_pretrained(ckpt)
    model = load_pretrained(ckpt, device="cpu", dtype=getattr(torch, args.dtype))
    vocab = Vocabulary(proc.tokenizer.token_bytes(), model.config.eos_token_id, model.config.vocab_size)
    start = time.perf_counter()
    grammar = vocab.grammar(Field("x", "q", "regex", pattern=PATTERN).regex)
    build = time.perf_counter() - start
    sample = proc.prepare_one(test_image(640, 480, seed=1), "What is the invoice number?\n")
    out = {"cpu": cpu(), "threads": torch.get_num_threads(), "dtype": args.dtype,
           "logits": model.config.vocab_size, "grammar_build_s": round(build, 3), "steps": args.steps}

    def timed(batch, n, **kw) -> tuple[float, int]:
        start = time.perf_counter()
        new = generate(model, batch, n, **kw)
        new = new[0] if isinstance(new, tuple) else new
        return time.perf_counter() - start, new.shape[1]

    for B in args.batch:
        batch = proc.collate([sample] * B)
        runs = {"free": dict(logprobs=True), "constrained": dict(logprobs=True, constraints=[grammar] * B),
                "no_scores": dict(logprobs=False)}
        for kw in runs.values():  # warm up
            timed(batch, 2, **kw)
        steps: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, kw in runs.items():
                one, _ = timed(batch, 1, **kw)
                many, n = timed(batch, args.steps + 1, **kw)
                assert n == args.steps + 1, (name, n)  # every run decodes every step
                steps[name].append((many - one) / args.steps)
        med = {k: statistics.median(v) for k, v in steps.items()}
        out[f"batch{B}"] = {"step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
                            "constrained_over_free": round(med["constrained"] / med["free"], 3),
                            "scores_over_none": round(med["free"] / med["no_scores"], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
