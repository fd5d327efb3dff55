#!/usr/bin/env bash
# Quantize the testbed with SpQR (3-bit, Hugging Face `spqr` layout) and print its eval beside fp32.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
OUT="$DEMO_OUT/testbed-spqr3"
"$LCTOOL" -q quantize "$TESTBED" "$OUT" --method spqr --bits 3 --calib wiki --calib-n 32 --calib-len 256 --force --json \
  > "$DEMO_OUT/spqr3-summary.json"
"$LCTOOL" -q eval "$TESTBED" --corpus wiki --ctx 256 --json > "$DEMO_OUT/eval-fp32.json"
"$LCTOOL" -q eval "$OUT" --corpus wiki --ctx 256 --reference "$TESTBED" --json > "$DEMO_OUT/eval-spqr3.json"
"$PY" - "$DEMO_OUT" <<'PY'
import json
import sys

out = sys.argv[1]
summary = json.load(open(f"{out}/spqr3-summary.json"))
fp32 = json.load(open(f"{out}/eval-fp32.json"))
spqr = json.load(open(f"{out}/eval-spqr3.json"))
kl = spqr.get("kl", {})
kl = kl.get("kl", kl.get("mean")) if isinstance(kl, dict) else kl
print(f"{'model':<11} {'ppl':>8} {'bpb':>7} {'KL to fp32':>10} {'bits/param':>10} {'outliers':>8}")
print(f"{'fp32':<11} {fp32['perplexity']['ppl']:>8.3f} {fp32['perplexity']['bpb']:>7.4f} {'-':>10} {32:>10.3f} {'-':>8}")
print(f"{'spqr 3-bit':<11} {spqr['perplexity']['ppl']:>8.3f} {spqr['perplexity']['bpb']:>7.4f} "
      f"{kl if kl is None else format(kl, '.5f'):>10} {summary['bits_per_param_stored']:>10.3f} {summary['outlier_rate']:>8.2%}")
print(f"(spqr bits/param in the paper's accounting: {summary['bits_per_param_paper']:.3f}; quantized in {summary['wall_s']:.0f} s)")
PY
