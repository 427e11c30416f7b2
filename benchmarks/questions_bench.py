"""Several questions about one image: the image prefilled once for all of them, against the same
image given as N copies with one question each (issue 12's benchmark).

    python benchmarks/questions_bench.py [--model DIR] [--questions 5] [--new-tokens 4] [--repeats 3]

Without --model, the mid-size random checkpoint (hidden 1024, 8 layers, 262,144 vocabulary,
bfloat16) is written to a temporary folder first. Both runs go through the CLI's Runner (the
same batching as `fuyu ask`, default batch size), on one 1280×720 screenshot. Model time is the
sum of the records' `seconds` (preprocessing plus each record's share of its batch), as in the
records `fuyu ask` writes; the wall time of each run is printed too. Runs alternate, medians.
One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is the total amount?", "What is the date?", "Who is the vendor?",
             "What is the invoice number?", "Which currency is used?", "What is the tax?",
             "Who is the customer?", "What is the due date?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    from fuyu.benchmarks.workloads import test_image
    from fuyu.options import GenOptions, ModelSpec
    from fuyu.records import Ask, Item, Unit
    from fuyu.runner import Runner

    tmp = Path(tempfile.mkdtemp(prefix="fuyu-questions-"))
    ckpt = args.model
    if ckpt is None:
        import torch

        from fuyu.testing import make_checkpoint

        ckpt = make_checkpoint(tmp / "mid", hidden=1024, heads=16, layers=8, vocab_size=262144,
                               dtype=torch.bfloat16, shards=2)
    runner = Runner.load(ModelSpec(path=str(ckpt), device="cpu", dtype=args.dtype))
    image = tmp / "screenshot.png"
    test_image(1280, 720, seed=3).save(image)
    copies = []
    for i in range(args.questions):
        copies.append(tmp / f"copy{i}.png")
        copies[-1].write_bytes(image.read_bytes())
    asks = tuple(Ask("ask", q) for q in QUESTIONS[:args.questions])
    gen = GenOptions(max_new_tokens=args.new_tokens)
    batch = runner.default_batch_size()

    def shared():
        return list(runner.run([Unit(Item(str(image)), asks)], batch, gen))

    def separate():
        return list(runner.run([Unit(Item(str(c)), (a,)) for c, a in zip(copies, asks)], batch, gen))

    shared(), separate()  # warm-up
    results = {"shared": [], "separate": []}
    for _ in range(args.repeats):
        for name, fn in (("shared", shared), ("separate", separate)):
            start = time.perf_counter()
            recs = fn()
            wall = time.perf_counter() - start
            assert all(r.ok for r in recs) and len(recs) == args.questions, recs
            results[name].append((sum(r.seconds for r in recs), wall, [r.text for r in recs]))
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in results.items()}
    same = results["shared"][-1][2] == results["separate"][-1][2]
    from fuyu.model.native.build import cpu_model

    out = {"cpu": cpu_model(), "model": str(args.model or "mid (random)"), "dtype": args.dtype,
           "questions": args.questions, "new_tokens": args.new_tokens, "image": "1280x720",
           "prompt_tokens_image": 24 * (43 + 1),
           "shared_model_s": round(med["shared"][0], 3), "separate_model_s": round(med["separate"][0], 3),
           "shared_wall_s": round(med["shared"][1], 3), "separate_wall_s": round(med["separate"][1], 3),
           "model_time_ratio": round(med["separate"][0] / med["shared"][0], 2),
           "same_answers": same}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
