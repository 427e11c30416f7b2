"""`fuyu benchmark --compare reference`: the same inputs through transformers 4.57.6, alternating.

The reference is the test oracle (`pip install -e .[test]`), imported only when this runs.
"""

from __future__ import annotations

from pathlib import Path

from fuyu.benchmarks import workloads
from fuyu.errors import FuyuError


def compare_reference(model_dir: Path, net, proc, dtype, device, photo, files, prompt: str, repeats: int) -> dict:
    """End-to-end seconds (processor + generate) for ours and the reference, and their ratio, and
    how many greedy tokens agree: with the reference run on the same batches as ours (one per
    image size, decoded together), with its one padded batch of all the images (the timed run: in 16-bit, padding
    changes its own roundings), and with its eager attention. In 16-bit, agreement is not the
    contract (tests/test_accuracy.py is): random weights' near-flat logits flip on any rounding."""
    try:
        import transformers
        from transformers import AutoTokenizer, FuyuForCausalLM, FuyuImageProcessor, FuyuProcessor
    except ImportError:
        raise FuyuError("--compare reference needs transformers==4.57.6",
                        "pip install -e '.[test]'") from None
    transformers.utils.logging.disable_progress_bar()  # its "Loading checkpoint shards" bar
    ref = FuyuForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    default_attention = ref.config._attn_implementation  # what a user of the reference gets (sdpa)
    ref_proc = FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(model_dir))
    from PIL import Image

    mixed = [Image.open(f).convert("RGB") for f in files]
    out = {"version": transformers.__version__}
    for name, images, n_new in (("batch1_32tok", [photo], 32), ("batch8_mixed_20tok", mixed, 20)):
        groups = workloads.group_by_size(images)  # how we batch: one batch per image size, no padding

        def ours():  # each size prefilled alone, all decoded together (as `fuyu caption -b 8`)
            new = workloads.generate_on(net, [proc(images=g, prompts=[prompt] * len(g)) for g in groups],
                                        n_new, eos_id=-1)
            return list(new.split([len(g) for g in groups]))

        def theirs(batch=images):  # how a user of the reference batches: all at once, left-padded
            inputs = ref_proc(text=[prompt] * len(batch), images=batch, return_tensors="pt").to(device)
            out = ref.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               pad_token_id=net.config.eos_token_id)
            return out[:, inputs["input_ids"].shape[1]:]

        mine = ours()  # also the warm-up of both
        same = _same_tokens(mine, [theirs(group) for group in groups])  # like for like: same batches
        one_batch = theirs()
        position = {id(item): i for i, item in enumerate(images)}
        rows = [one_batch[[position[id(item)] for item in group]] for group in groups]
        same_one_batch = _same_tokens(mine, rows)  # the reference's padded batch rounds otherwise
        ref.set_attn_implementation("eager")  # the reference's plain (eager) attention maths, untimed
        same_eager = _same_tokens(mine, [theirs(group) for group in groups])
        ref.set_attn_implementation(default_attention)
        a, b = [], []
        for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
            a.append(_once(ours, device))
            b.append(_once(theirs, device))
        sa, sb = workloads.Stat.of(a), workloads.Stat.of(b)
        out[name] = {"ours_s": round(sa.median, 3), "reference_s": round(sb.median, 3),
                     "speedup": round(sb.median / sa.median, 2), "same_tokens": same,
                     "same_tokens_one_batch": same_one_batch, "same_tokens_eager": same_eager,
                     "reference_attention": default_attention}
    return out


def _same_tokens(ours: list, theirs: list) -> str:
    """How many generated tokens equal the reference's, as "k/n", over batches of equal shapes."""
    equal = total = 0
    for mine, ref in zip(ours, theirs):
        equal += int((mine.cpu() == ref.cpu()).sum())
        total += ref.numel()
    return f"{equal}/{total}"


def _once(fn, device) -> float:
    workloads._sync(device)
    start = workloads.time.perf_counter()
    fn()
    workloads._sync(device)
    return workloads.time.perf_counter() - start
