#!/usr/bin/env bash
# Fine-tuning: a short LoRA run adapting the testbed (pretrained on wiki) to Shakespeare, merged into a
# full checkpoint, then held-out perplexity on both domains before and after.
set -euo pipefail
TESTBED=$($LCTOOL testbed path)
OUT="$DEMO_OUT/finetune"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

$LCTOOL -q finetune "$TESTBED" "$OUT/lora-shakespeare" --data shakespeare --seq-len 128 --batch 8 --steps 40 \
  --lr 1e-3 --warmup 4 --merge --force --json > "$OUT/finetune.json"

for name in testbed lora-shakespeare; do
  model="$OUT/$name"
  [ "$name" = testbed ] && model="$TESTBED"
  for corpus in shakespeare wiki; do
    $LCTOOL -q eval "$model" --corpus "$corpus:eval" --ctx 256 --max-tokens 8192 --json > "$OUT/$name.$corpus.json"
  done
done

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
run = json.load(open(f"{out}/finetune.json"))
print(f"LoRA r16 on all linear roles: {run['steps']} steps, loss {run['first_loss']} -> {run['final_loss']}, "
      f"{run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mb']:.0f} MB")
print(f"{'model':18s} {'shakespeare ppl':>16s} {'wiki ppl':>10s}")
for name in ("testbed", "lora-shakespeare"):
    ppl = [json.load(open(f"{out}/{name}.{c}.json"))["perplexity"]["ppl"] for c in ("shakespeare", "wiki")]
    print(f"{name:18s} {ppl[0]:16.2f} {ppl[1]:10.2f}")
PY
