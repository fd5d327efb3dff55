#!/usr/bin/env bash
# Expand the testbed's vocabulary for Shakespeare (new BPE merges continuing its own), with mean and
# random init, and compare tokens per character and bits-per-byte on held-out Shakespeare and wiki.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
V="$DEMO_OUT/vocab"
mkdir -p "$V"
for init in mean random; do
  "$LCTOOL" --quiet vocab expand "$TESTBED" "$V/shakespeare-$init" --corpus shakespeare --num-new 512 \
    --init "$init" --pad-to-multiple 64 --force --json > "$V/expand-$init.json"
done
"$LCTOOL" vocab fertility "$TESTBED" "$V/shakespeare-mean" --corpus shakespeare:eval --corpus wiki:eval
# bits-per-byte on the same 40k characters of each eval split, for every model
"$PY" - "$V" <<'PYEOF'
import sys
from lctool.data import corpus_text
for name in ("shakespeare", "wiki"):
    with open(f"{sys.argv[1]}/{name}-eval-40k.txt", "w", encoding="utf-8") as f:
        f.write(corpus_text(name, "eval")[:40_000])
PYEOF
for model in "$TESTBED" "$V/shakespeare-mean" "$V/shakespeare-random"; do
  for name in shakespeare wiki; do
    "$LCTOOL" eval "$model" --text "$V/$name-eval-40k.txt" --ctx 256 --json > "$V/eval-$(basename "$model")-$name.json"
  done
done
"$PY" - "$V" "$(basename "$TESTBED")" <<'PYEOF'
import json, sys
folder, testbed = sys.argv[1], sys.argv[2]
rows = [("testbed (no expansion)", testbed), ("+512 tokens, mean init", "shakespeare-mean"),
        ("+512 tokens, random init", "shakespeare-random")]
bpb = lambda m, n: json.load(open(f"{folder}/eval-{m}-{n}.json"))["perplexity"]["bpb"]
print(f"{'model':<26} {'bpb shakespeare':>16} {'bpb wiki':>10}   (no fine-tune yet)")
for label, model in rows:
    print(f"{label:<26} {bpb(model, 'shakespeare'):>16.4f} {bpb(model, 'wiki'):>10.4f}")
PYEOF
