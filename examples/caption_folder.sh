#!/usr/bin/env bash
# Caption every image under a folder into a JSON-lines file, then use the results in a pipeline.
# Safe to rerun: images already in the file are skipped, so a crash or Ctrl-C loses nothing.
#
#   examples/caption_folder.sh [FOLDER] [OUT.jsonl]
#
# The model comes from --model DIR, $FUYU_MODEL, or the Hugging Face cache copy of adept/fuyu-8b.
set -euo pipefail
folder=${1:-examples/assets}
out=${2:-captions.jsonl}

# Exit code 1 means some images failed (they are in the file with an "error" field and will be
# retried on the next run); anything else non-zero is fatal.
status=0
fuyu caption "$folder" --recursive --output "$out" || status=$?
[ "$status" -le 1 ] || exit "$status"

# path<TAB>caption for the images that worked, sorted by path.
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" not in r:
        print(r["path"], r["text"], sep="\t")
' "$out" | sort

# The same without Python, for jq users:
#   jq -r 'select(.error == null) | [.path, .text] | @tsv' "$out"
# Images that failed, and why:
#   jq -r 'select(.error) | "\(.path): \(.error)"' "$out"
# Only new screenshots, as a find | fuyu pipeline with sidecars next to each image:
#   find "$folder" -name '*.png' -newer "$out" -print0 | fuyu caption - --null --sidecar --quiet
exit "$status"
