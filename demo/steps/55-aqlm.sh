#!/usr/bin/env bash
# Quantize the testbed with AQLM (2 codebooks x 8 bits, groups of 8: ≈2 bits + codebooks) and print its eval beside fp32.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
OUT="$DEMO_OUT/testbed-aqlm2x8"
"$LCTOOL" -q quantize "$TESTBED" "$OUT" --method aqlm --codebooks 2 --codebook-bits 8 --in-group-size 8 \
  --beam-size 2 --aqlm-rounds 1 --finetune-steps 20 --calib wiki --calib-n 8 --calib-len 128 --force --json \
  > "$DEMO_OUT/aqlm-summary.json"
"$LCTOOL" -q eval "$TESTBED" --corpus wiki --ctx 256 --json > "$DEMO_OUT/eval-fp32-aqlm.json"
"$LCTOOL" -q eval "$OUT" --corpus wiki --ctx 256 --reference "$TESTBED" --json > "$DEMO_OUT/eval-aqlm.json"
"$PY" - "$DEMO_OUT" <<'PY'
import json
import sys

out = sys.argv[1]
summary = json.load(open(f"{out}/aqlm-summary.json"))
fp32 = json.load(open(f"{out}/eval-fp32-aqlm.json"))
aqlm = json.load(open(f"{out}/eval-aqlm.json"))
kl = aqlm.get("kl", {})
kl = kl.get("kl", kl.get("mean")) if isinstance(kl, dict) else kl
print(f"{'model':<12} {'ppl':>8} {'bpb':>7} {'KL to fp32':>10} {'true bits/param':>15}")
print(f"{'fp32':<12} {fp32['perplexity']['ppl']:>8.3f} {fp32['perplexity']['bpb']:>7.4f} {'-':>10} {32:>15.3f}")
print(f"{'aqlm 2x8 g8':<12} {aqlm['perplexity']['ppl']:>8.3f} {aqlm['perplexity']['bpb']:>7.4f} "
      f"{kl if kl is None else format(kl, '.5f'):>10} {summary['bits_per_param_true']:>15.3f}")
print(f"(codes + codebooks + scales; quantized in {summary['wall_s']:.0f} s)")
PY
