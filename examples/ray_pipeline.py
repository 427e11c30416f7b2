"""Fuyu in your own Ray Data pipeline: read images as bytes, caption them on a pool of model
replicas, then write parquet (or print JSON lines).

    pip install 'fuyu[ray]'
    python examples/ray_pipeline.py CHECKPOINT_DIR IMAGES_DIR_OR_URI [--out DIR_OR_URI] [--workers N] [--gpus-per-worker 1]

It joins the cluster in RAY_ADDRESS (e.g. after `ray start --head`), or starts one on this machine.
On a cluster, every node needs fuyu installed and the checkpoint at CHECKPOINT_DIR (or pass a hub
repo id found in each node's Hugging Face cache); images and output may be s3://, gs://, hdfs:// URIs.
"""

import argparse
import json

import ray

from fuyu.cluster import FuyuPredictor
from fuyu.preprocess.image import IMAGE_EXTENSIONS

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="checkpoint folder (or hub repo id)")
parser.add_argument("images", help="a folder or URI prefix of images")
parser.add_argument("--out", help="write parquet files here; default: print JSON lines")
parser.add_argument("--question", help="ask this instead of captioning")
parser.add_argument("--workers", type=int, default=1, help="model replicas")
parser.add_argument("--gpus-per-worker", type=float, default=0)
parser.add_argument("--cpus-per-worker", type=float, default=1, help="also each replica's torch threads")
parser.add_argument("--batch-size", type=int, default=8, help="rows per call (the model batches within)")
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
args = parser.parse_args()

ray.init()
# Rows: {"bytes", "path"}; non-image files are left out by extension.
ds = ray.data.read_binary_files(args.images, include_paths=True,
                                file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS])
task = {"task": "ask", "question": args.question} if args.question else {"task": "caption"}
ds = ds.map_batches(
    FuyuPredictor,
    fn_constructor_kwargs={"model": args.model, "max_new_tokens": args.max_new_tokens,
                          "dtype": args.dtype, **task},
    compute=ray.data.ActorPoolStrategy(size=args.workers),  # the model loads once per replica
    num_gpus=args.gpus_per_worker, num_cpus=args.cpus_per_worker, batch_size=args.batch_size)

if args.out:
    ds.write_parquet(args.out)  # columns: path, id, task, prompt, text, boxes, ..., error
else:
    for row in ds.iter_rows():  # one row per image; a bad image has `error` instead of `text`
        print(json.dumps({k: v for k, v in row.items() if v is not None}), flush=True)
