#!/usr/bin/env bash
# Two short LoRA fine-tunes of the testbed (Shakespeare, Python docs), merged back into one model with
# DARE-TIES; perplexity of the base, both parents and the merge on each fine-tune's held-out text.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
OUT="$DEMO_OUT/merge"
mkdir -p "$OUT"
for corpus in shakespeare pydoc; do
  "$LCTOOL" -q finetune "$TESTBED" "$OUT/ft-$corpus" --data "$corpus" --steps 20 --batch 4 --seq-len 128 \
    --lr 2e-3 --merge --seed 1 --force --json > /dev/null
done
"$LCTOOL" -q merge --method dare_ties --base "$TESTBED" "$OUT/ft-shakespeare" "$OUT/ft-pydoc" \
  --weight 0.5,0.5 --density 0.5 --seed 1 --force "$OUT/dare-ties"
"$PY" - "$TESTBED" "$OUT" <<'PYEOF'
import sys

import torch

from lctool.data import corpus_text
from lctool.eval import load_for_eval, perplexity

torch.set_num_threads(2)
testbed, out = sys.argv[1], sys.argv[2]
models = {"testbed (base)": testbed, "ft shakespeare": f"{out}/ft-shakespeare", "ft pydoc": f"{out}/ft-pydoc",
          "dare_ties merge": f"{out}/dare-ties"}
texts = {name: corpus_text(name, "eval")[:10000] for name in ("shakespeare", "pydoc")}
print(f"{'model':18s} " + " ".join(f"{'ppl ' + name:>16s}" for name in texts))
for label, path in models.items():
    model, tokenizer = load_for_eval(path)
    scores = [perplexity(model, tokenizer, text, ctx=256)["ppl"] for text in texts.values()]
    print(f"{label:18s} " + " ".join(f"{s:16.2f}" for s in scores))
PYEOF
