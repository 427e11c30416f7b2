"""How close each quantization comes to float32: ours (int8, int4, through the kernels a load
picks) against bitsandbytes' own (8bit = LLM.int8, nf4), teacher-forced as the 16-bit contract is.

    python -m fuyu.benchmarks.quant_accuracy CKPT [--samples 3] [--steps 24] [--schemes int8,8bit,...]

Truth is our float32 model (within 1e-4 of the reference's float32 logits: tests/test_model_parity.py)
along its own greedy continuation of each sample (an image and a caption prompt): the logits at the
prompt's last position and after each forced token, through prefill and cached decode steps. Every
scheme is loaded from the same checkpoint in bfloat16 and forced along the same tokens. For each:
max |Δlogit|, mean |Δlogit| and the share of positions whose top-1 token is float32's, over all
positions (benchmarks/accuracy.py's measures). The contract of issue 23: int8 at least as close as
bitsandbytes' 8bit, int4 as close as nf4 (mean |Δ| and top-1; the max is reported). A scheme
name may end in "+head" (the LM head quantized too) or, for int4, "/64" (groups of 64) and
"@uniform" (16 even levels instead of the normal ones).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from fuyu.benchmarks.accuracy import errors, ours_forced

DEFAULT = "bf16,int8,int8+head,8bit,int4,int4@uniform,int4/64,int4+head,nf4"


def scheme(name: str):
    """load_pretrained's quantization for a row name: None (bf16), a method, or a dict."""
    if name == "bf16":
        return None
    method, head = name.removesuffix("+head"), name.endswith("+head")
    method, _, levels = method.partition("@")
    method, _, group = method.partition("/")
    spec = {"method": method}
    if group:
        spec["group_size"] = int(group)
    if levels:
        spec["levels"] = levels
    if head:
        spec["skip"] = ["vision_embed_tokens"]
    return spec if len(spec) > 1 else method


def samples(proc, n: int):
    from fuyu.benchmarks import workloads
    from fuyu.preprocess import TASK_PROMPTS

    out = []
    for i in range(n):
        b = proc(images=[workloads.test_image(160 + 60 * i, 120 + 30 * i, seed=i)], prompts=[TASK_PROMPTS["caption"]])
        out.append((b.input_ids, b.image_patches))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--schemes", default=DEFAULT)
    args = ap.parse_args(argv)

    from fuyu.model import load_pretrained
    from fuyu.model.native.build import cpu_model
    from fuyu.preprocess import FuyuProcessor

    proc = FuyuProcessor.from_pretrained(args.ckpt)
    data = samples(proc, args.samples)
    truth32 = load_pretrained(args.ckpt, dtype=torch.float32)
    forced, truth = [], []
    with torch.inference_mode():
        for ids, patches in data:
            from fuyu.model import generate

            toks = generate(truth32, dict(input_ids=ids, image_patches=patches), args.steps, eos_id=-1)[0]
            forced.append(toks)
            truth.append(ours_forced(truth32, ids, patches, toks))
    del truth32
    gc.collect()
    rows = {}
    for name in args.schemes.split(","):
        model = load_pretrained(args.ckpt, dtype=torch.bfloat16, quantization=scheme(name))
        with torch.inference_mode():
            got = [ours_forced(model, ids, patches, toks) for (ids, patches), toks in zip(data, forced)]
        err = errors(truth, got).as_dict()
        plan = model.backend.plan if model.backend is not None else None
        err["kernels"] = None if plan is None else plan.describe()
        rows[name] = err
        print(f"{name:12} max {err['max']:.4f}  mean {err['mean']:.4f}  top-1 {err['top1']:.3f}  ({err['kernels']})",
              flush=True)
        del model
        gc.collect()
    result = {"cpu": cpu_model(), "ckpt": str(args.ckpt), "samples": args.samples, "steps": args.steps, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
