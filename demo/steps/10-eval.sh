#!/usr/bin/env bash
# Evaluate the testbed: perplexity and bits-per-byte on the wiki eval split, perplexity versus
# context length up to 4x its training length (PNG), and a small passkey retrieval grid.
set -euo pipefail
TESTBED=$("$LCTOOL" testbed path)
"$LCTOOL" eval "$TESTBED" --ctx 256 --lengths 256,512,1024 --plot "$DEMO_OUT/ppl_vs_length.png" \
  --passkey --passkey-depths 0,0.5,1 --passkey-trials 2 --max-tokens 16384
