# What every example Makefile shares: where lctool is, the output folder, and option stamps.

EXAMPLES := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
ROOT     := $(abspath $(EXAMPLES)/..)
LCTOOL   ?= $(firstword $(wildcard $(ROOT)/.venv/bin/lctool) lctool)
PYTHON   ?= $(firstword $(wildcard $(ROOT)/.venv/bin/python) python3)
GLOBAL   ?= --quiet
OUT      ?= out
TABLE    := $(EXAMPLES)/table.py

# The step logs (each command's --json result), evaluations and option stamps live beside the artifacts.
$(shell mkdir -p $(OUT)/log $(OUT)/eval $(OUT)/.options)

# $(call options,VARIABLE) names $(OUT)/.options/VARIABLE, a file holding the value of that make
# variable. It is rewritten only when the value differs from what it holds, so as a prerequisite
# it makes a step rerun after its options change, and only then. (Pass the variable's name, not its
# value: option strings hold commas, which $(call) would split.)
options = $(shell f='$(OUT)/.options/$(1)'; \
  printf '%s\n' '$(subst ','\'',$($(1)))' > "$$f.new"; \
  if cmp -s "$$f.new" "$$f"; then rm -f "$$f.new"; else mv "$$f.new" "$$f"; fi; \
  echo "$$f")

.DELETE_ON_ERROR:
.PHONY: all clean
.DEFAULT_GOAL := all

clean:
	rm -rf $(OUT)
