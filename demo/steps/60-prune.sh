#!/usr/bin/env bash
# Prune 20% of the testbed's parameters (LLM-Pruner, Taylor importance, uniform so stock-loadable),
# recover with a short LoRA run, and compare perplexity, bits-per-byte and KL to the dense model.
set -euo pipefail
TESTBED=$($LCTOOL testbed path)
PLAIN="$DEMO_OUT/testbed-pruned20"
RECOVERED="$DEMO_OUT/testbed-pruned20-recovered"
$LCTOOL -q prune "$TESTBED" "$PLAIN" --method llm-pruner --ratio 0.2 --importance taylor-element --uniform \
  --force --json > "$DEMO_OUT/prune20-summary.json"
$LCTOOL -q prune "$TESTBED" "$RECOVERED" --method llm-pruner --ratio 0.2 --importance taylor-element --uniform \
  --recover-steps 20 --recover-lr 1e-3 --force --json > "$DEMO_OUT/prune20-recovered-summary.json"
for name in dense:"$TESTBED" pruned:"$PLAIN" recovered:"$RECOVERED"; do
  $LCTOOL -q eval "${name#*:}" --corpus wiki --ctx 256 --max-tokens 8192 --reference "$TESTBED" --json \
    > "$DEMO_OUT/eval-prune-${name%%:*}.json"
done
$PY - "$DEMO_OUT" <<'PY'
import json, sys
out = sys.argv[1]
summary = json.load(open(f"{out}/prune20-recovered-summary.json"))
layer = summary["layers"][0]
print(f"removed {summary['removed_params']:,} of {summary['params_before']:,} parameters "
      f"({summary['removed_fraction']:.1%}); every layer now {layer['heads']} heads / {layer['kv_heads']} kv heads / "
      f"{layer['intermediate_size']} MLP channels; stock-loadable: {summary['stock_loadable']}")
print(f"recovery: {summary['recovery']['steps']} LoRA steps, loss {summary['recovery']['first_loss']} -> "
      f"{summary['recovery']['final_loss']}")
print(f"{'model':<22} {'ppl':>8} {'bpb':>7} {'KL to dense':>12}")
for name in ("dense", "pruned", "recovered"):
    result = json.load(open(f"{out}/eval-prune-{name}.json"))
    label = {"dense": "dense", "pruned": "pruned 20%", "recovered": "pruned 20% + LoRA"}[name]
    print(f"{label:<22} {result['perplexity']['ppl']:>8.2f} {result['perplexity']['bpb']:>7.4f} {result['kl']['kl']:>12.4f}")
PY
