"""One caption through the reference (transformers 4.57.6) as its users run it, or through ours
(--ours), in a process of its own, for its load time, caption time and peak memory at real size:

    /usr/bin/time -v python -m fuyu.benchmarks.reference_peak CKPT IMAGE --new-tokens 8
    /usr/bin/time -v fuyu caption IMAGE --model CKPT --max-new-tokens 8

(`Maximum resident set size` of each). End to end, load excluded, in alternating processes (the
machine's speed drifts; each side gets the same drift):

    for i in 1 2 3; do python -m fuyu.benchmarks.reference_peak CKPT IMAGE --new-tokens 32;
                       python -m fuyu.benchmarks.reference_peak CKPT IMAGE --new-tokens 32 --ours; done

Both generate exactly --new-tokens tokens, greedy. The reference is the test oracle (`pip install
-e .[test]`), imported only here; it loads with low_cpu_mem_usage=True, as its documentation
advises for big checkpoints. Ours loads as the CLI does (bfloat16, the kernel plan, huge pages for
torch's buffers). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", default="Generate a coco-style caption.\n")
    ap.add_argument("--ours", action="store_true", help="time ours instead of the reference")
    args = ap.parse_args(argv)
    if args.ours:
        return ours(args)

    import torch
    import transformers
    from PIL import Image
    from transformers import AutoTokenizer, FuyuForCausalLM, FuyuImageProcessor, FuyuProcessor

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = FuyuForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                            low_cpu_mem_usage=True).eval()
    proc = FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(args.model))
    loaded = time.perf_counter()
    inputs = proc(text=[args.prompt], images=[Image.open(args.image).convert("RGB")], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    done = time.perf_counter()
    res = {"reference": transformers.__version__, "load_s": round(loaded - start, 2),
           "caption_s": round(done - loaded, 2), "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}
    print(json.dumps(res))
    return res


def ours(args) -> dict:
    from fuyu import threads

    threads.before_torch()  # as the CLI: threads, huge pages for torch's buffers
    import torch
    from PIL import Image

    from fuyu.model import generate, load_pretrained
    from fuyu.preprocess import FuyuProcessor

    threads.configure()
    start = time.perf_counter()
    model = load_pretrained(args.model, dtype=getattr(torch, args.dtype))
    proc = FuyuProcessor.from_pretrained(args.model)
    loaded = time.perf_counter()
    batch = proc(images=[Image.open(args.image).convert("RGB")], prompts=[args.prompt])
    out = generate(model, batch, args.new_tokens, eos_id=-1)
    done = time.perf_counter()
    again = time.perf_counter()  # the first token alone, warm, for the split (not in caption_s)
    generate(model, batch, 1, eos_id=-1)
    first = time.perf_counter() - again
    res = {"ours": model.backend.plan.describe() if model.backend is not None else "gpu",
           "load_s": round(loaded - start, 2), "caption_s": round(done - loaded, 2),
           "first_token_warm_s": round(first, 2),
           "prompt_tokens": int(batch.input_ids.shape[1]), "new_tokens": int(out.shape[1]),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
