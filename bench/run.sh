#!/usr/bin/env bash
# Run every benchmark and append the results to bench/RESULTS.md.
# The Flower reference lives only in .bench-venv (never in the project's own dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .bench-venv/bin/python ]; then
  python3 -m venv .bench-venv
  .bench-venv/bin/pip install -q -e . "flwr>=1.20,<2" psutil prometheus-client
fi
if [ ! -x .agent-venv/bin/python ]; then
  python3 -m venv .agent-venv
  .agent-venv/bin/pip install -q ".[agent]"
fi
out=$(mktemp)
{
  .bench-venv/bin/python bench/codec.py
  echo
  .bench-venv/bin/python bench/aggregate.py
  echo
  .bench-venv/bin/python bench/round.py 2>/dev/null | grep -v "INFO\|WARNING"
  echo
  .venv/bin/python bench/intake.py 2>/dev/null
  echo
  .venv/bin/python bench/agent_footprint.py --agent-venv .agent-venv 2>/dev/null
} | tee "$out"
{ echo; cat "$out"; } >> bench/RESULTS.md
