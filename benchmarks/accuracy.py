"""The 16-bit accuracy contract: ours against the reference's own 16-bit run, both against float32.

Truth is the float32 reference (transformers 4.57.6, eager attention) teacher-forced along its own
greedy continuation: the logits at the prompt's last position and after each of `steps` forced
tokens, through its KV-cached decode. The reference in 16-bit (as its users load it: SDPA) and our
model are teacher-forced along the same tokens through their cached decode paths (ours: prefill,
then decode_step). For each, over all those positions: max |Δlogit|, mean |Δlogit| and the share
of positions whose top-1 token equals float32's.

Contract (issue 10): ours.max ≤ 1.25 × ref.max, ours.mean ≤ 1.1 × ref.mean, ours.top1 ≥ ref.top1.
transformers is imported inside the functions: it is the test oracle, never a dependency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Errors:
    max: float
    mean: float
    top1: float
    positions: int

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def errors(truth: list[torch.Tensor], got: list[torch.Tensor]) -> Errors:
    """Errors of logits `got` against `truth`, lists of (N_i, V) over samples."""
    t, g = torch.cat([x.float() for x in truth]), torch.cat([x.float() for x in got])
    diff = (g - t).abs()
    top1 = (g.argmax(-1) == t.argmax(-1)).float().mean().item()
    return Errors(diff.max().item(), diff.mean().item(), top1, t.shape[0])


def meets_contract(ours: Errors, ref: Errors) -> bool:
    return ours.max <= 1.25 * ref.max and ours.mean <= 1.1 * ref.mean and ours.top1 >= ref.top1


@torch.no_grad()
def reference_forced(ref, ids: torch.Tensor, patches: torch.Tensor | None, forced: torch.Tensor) -> torch.Tensor:
    """Reference logits (1 + len(forced) - 1, V) for one unpadded sample ids (1, T): the last prompt
    position, then one cached decode step per forced token but the last."""
    mask = torch.ones_like(ids)
    out = ref(input_ids=ids, attention_mask=mask, image_patches=None if patches is None else [patches[None]],
              use_cache=True)
    rows, past = [out.logits[:, -1]], out.past_key_values
    for tok in forced[:-1]:
        mask = torch.cat([mask, mask[:, :1]], 1)
        out = ref(input_ids=tok.view(1, 1), attention_mask=mask, past_key_values=past, use_cache=True,
                  position_ids=torch.tensor([[mask.shape[1] - 1]]))
        rows.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.cat(rows).float()


@torch.no_grad()
def ours_forced(model, ids: torch.Tensor, patches: torch.Tensor | None, forced: torch.Tensor) -> torch.Tensor:
    """Our logits at the same positions, through prefill and decode_step."""
    from fuyu.model import decode_step, prefill

    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_patches=patches)
    cache, last = prefill(model, batch, max_new_tokens=len(forced))
    rows = [last]
    for tok in forced[:-1]:
        rows.append(decode_step(model, cache, tok.view(1).to(last.device)))
    return torch.cat(rows).float().cpu()


def greedy_forced_tokens(ref32, ids, patches, steps: int) -> torch.Tensor:
    """The float32 reference's greedy continuation (steps,) of one sample."""
    with torch.no_grad():
        out = ref32.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             image_patches=None if patches is None else [patches[None]],
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=ref32.config.eos_token_id)
    return out[0, ids.shape[1]:]


def compare(ckpt, samples: list[tuple[torch.Tensor, torch.Tensor | None]], steps: int = 24,
            dtype: torch.dtype = torch.bfloat16, ours=None, keep_logits: bool = False) -> dict:
    """{"reference": Errors, "ours": Errors, "meets": bool} over unpadded samples [(ids (1, T), patches)];
    keep_logits adds "logits": {"truth", "ref", "ours"}: lists of (steps, V), to pool runs."""
    import transformers

    from fuyu.model import load_pretrained

    ref32 = transformers.FuyuForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ref16 = transformers.FuyuForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    ours = ours if ours is not None else load_pretrained(ckpt, dtype=dtype)
    truth, theirs, mine = [], [], []
    for ids, patches in samples:
        forced = greedy_forced_tokens(ref32, ids, patches, steps)
        truth.append(reference_forced(ref32, ids, patches, forced))
        theirs.append(reference_forced(ref16, ids, patches, forced))
        mine.append(ours_forced(ours, ids, patches, forced))
    ref_err, our_err = errors(truth, theirs), errors(truth, mine)
    out = {"reference": ref_err, "ours": our_err, "meets": meets_contract(our_err, ref_err)}
    if keep_logits:
        out["logits"] = {"truth": truth, "ref": theirs, "ours": mine}
    return out
