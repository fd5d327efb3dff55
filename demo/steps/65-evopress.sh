#!/usr/bin/env bash
# EvoPress on the testbed: search which attention / MLP blocks to drop (one of each, the budget of one
# whole layer) against KL to the dense model, and compare with dropping the middle layer.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
OUT="$DEMO_OUT/testbed-evopress-blocks"
MIDDLE="$DEMO_OUT/testbed-drop-middle"
SEARCH=(--calib wiki --calib-n 8 --calib-len 128 --generations 4 --offspring 6 --selection-tokens 256,1024
        --survivors 2,1 --state "$DEMO_OUT/evopress-blocks-state.json" --force)
"$LCTOOL" -q prune "$TESTBED" "$OUT" --method evopress --space blocks --target 1 "${SEARCH[@]}" --json \
  > "$DEMO_OUT/evopress-blocks-summary.json"
"$PY" - "$TESTBED" "$MIDDLE" <<'PY'
import sys
from lctool.io import Checkpoint, CheckpointWriter
from lctool.prune.evopress.output import write_blocks
checkpoint = Checkpoint(sys.argv[1])
middle = checkpoint.arch.num_layers // 2
with CheckpointWriter(sys.argv[2], operation="prune", inputs=[checkpoint], force=True) as writer:
    write_blocks(checkpoint, writer, {"attn": [middle], "mlp": [middle]})
PY
for name in evopress:"$OUT" middle:"$MIDDLE"; do
  "$LCTOOL" -q eval "${name#*:}" --corpus wiki --ctx 256 --max-tokens 4096 --reference "$TESTBED" \
    --trust-remote-code --json > "$DEMO_OUT/eval-blocks-${name%%:*}.json"
done
"$LCTOOL" -q eval "$TESTBED" --corpus wiki --ctx 256 --max-tokens 4096 --json > "$DEMO_OUT/eval-blocks-dense.json"
"$PY" - "$DEMO_OUT" <<'PY'
import json
import sys

out = sys.argv[1]
summary = json.load(open(f"{out}/evopress-blocks-summary.json"))
partial = summary["sublayers_removed"]
print(f"EvoPress dropped: whole layers {summary['layers_removed'] or 'none'} (original numbering), attention of "
      f"{partial['attn'] or 'none'}, MLP of {partial['mlp'] or 'none'} (new numbering); "
      f"{summary['evaluated']} candidates scored in {summary['search_s']:.0f} s, calibration KL "
      f"{summary['kl_initial']:.4f} (first parent) -> {summary['kl_final']:.4f}")
print(f"{'model':<26} {'ppl':>8} {'bpb':>7} {'KL to dense':>12}")
for name, label in (("dense", "dense"), ("middle", "middle layer dropped"), ("evopress", "EvoPress blocks dropped")):
    result = json.load(open(f"{out}/eval-blocks-{name}.json"))
    kl = result["kl"]["kl"] if "kl" in result else 0.0
    print(f"{label:<26} {result['perplexity']['ppl']:>8.2f} {result['perplexity']['bpb']:>7.4f} {kl:>12.4f}")
PY
