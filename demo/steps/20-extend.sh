#!/usr/bin/env bash
# Context extension: the testbed (L0 = 256) read at 4×L0 = 1024 tokens, before and after `lctool extend`
# (training-free YaRN, and a short E²-LLM fine-tune written as stock linear scaling).
set -euo pipefail
TESTBED=$($LCTOOL testbed path)
OUT="$DEMO_OUT/extend"
mkdir -p "$OUT"

$LCTOOL -q extend "$TESTBED" "$OUT/yarn-4x" --method yarn --factor 4 --force >/dev/null
$LCTOOL -q extend "$TESTBED" "$OUT/e2llm-4x" --method e2llm --factor 4 --steps 30 --batch-size 2 --lr 3e-4 \
  --force >/dev/null

for name in original yarn-4x e2llm-4x; do
  model="$OUT/$name"
  [ "$name" = original ] && model="$TESTBED"
  $LCTOOL -q eval "$model" --corpus wiki:eval --ctx 256 --lengths 1024 --max-tokens 3072 --json > "$OUT/$name.eval.json"
done

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'model':12s} {'ppl@256':>9s} {'ppl@1024':>9s} {'1024/256':>9s}")
for name in ("original", "yarn-4x", "e2llm-4x"):
    result = json.load(open(f"{out}/{name}.eval.json"))
    short, long = result["perplexity"]["ppl"], result["ppl_vs_length"][0]["ppl"]
    print(f"{name:12s} {short:9.2f} {long:9.2f} {long / short:9.3f}")
PY
