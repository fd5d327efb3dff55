#!/usr/bin/env bash
# Build (or reuse) the embedded testbed, round-trip it through lctool's writer, and inspect the copy.
set -euo pipefail
"$LCTOOL" testbed build
TESTBED=$("$LCTOOL" testbed path)
"$LCTOOL" --quiet convert "$TESTBED" "$DEMO_OUT/testbed-copy" --max-shard-size 10MB --force
"$LCTOOL" inspect "$DEMO_OUT/testbed-copy"
