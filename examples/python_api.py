"""Fuyu as a library, without the CLI: caption, ask and locate text in the example images.

    python examples/python_api.py CHECKPOINT_DIR      (e.g. the HF cache snapshot of adept/fuyu-8b)
"""

import sys
from pathlib import Path

import torch

from fuyu.model import generate, load_pretrained
from fuyu.preprocess import TASK_PROMPTS, FuyuProcessor, ask_prompt, text_to_box_prompt

ckpt = sys.argv[1]
assets = Path(__file__).parent / "assets"
device = "cuda" if torch.cuda.is_available() else "cpu"
processor = FuyuProcessor.from_pretrained(ckpt)
model = load_pretrained(ckpt, device=device, dtype=torch.bfloat16)

# Captions for three images in one left-padded batch; greedy decoding, stops at |ENDOFTEXT|.
images = [assets / "screenshot.png", assets / "document.png", assets / "chart.png"]
batch = processor(images=images, prompts=[TASK_PROMPTS["caption"]] * len(images))
for path, text in zip(images, processor.decode(generate(model, batch, max_new_tokens=32))):
    print(f"{path.name}: {text.strip()}")

# A question about the chart.
batch = processor(images=[assets / "chart.png"], prompts=[ask_prompt("Which country is highest?")])
print("answer:", processor.decode(generate(model, batch, max_new_tokens=16))[0].strip())

# Where is "Total due" on the invoice? Boxes come back in original-image pixels.
batch = processor(images=[assets / "document.png"], prompts=[text_to_box_prompt("Total due")])
new_ids = generate(model, batch, max_new_tokens=16)
print("boxes:", [tuple(box) for box in processor.boxes(new_ids, batch)[0]])
