#!/usr/bin/env bash
# The training step's GPU measurements (issue 17): B/16 and B/32 in bf16, eager vs SDPA,
# with and without torch.compile, train.sync_every 1 vs 25, FG-CLIP vs plain CLIP in the
# same process. About 7.5 minutes in all (every run has its own timeout, the whole set a
# budget: GPU_STEP_BUDGET_S, default 450). Writes JSON lines to ${OUT:-bench_out}/gpu_step.jsonl
# and a table to stdout. Run from anywhere: bash benchmarks/gpu_step.sh
#
# Needs a virtual environment with a CUDA build of torch (VENV, default .venv). A GPU
# machine without network access cannot create one: ship it, or a wheel directory.
#   - with network:  python3.11 -m venv .venv
#                    .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#                    .venv/bin/pip install -c requirements.lock -e .
#                    (or GPU_STEP_CREATE_VENV=1 bash benchmarks/gpu_step.sh, which runs those three)
#   - offline:       WHEELS=/path/to/wheels GPU_STEP_CREATE_VENV=1 bash benchmarks/gpu_step.sh
#                    (pip install --no-index --find-links "$WHEELS": the CUDA torch wheel and the lock's)
#   - an interpreter that already has CUDA torch, transformers, pydantic, PyYAML and safetensors:
#                    PYTHON=python3 bash benchmarks/gpu_step.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-$VENV/bin/python}"
OUT="${OUT:-bench_out}"
TORCH_VERSION="$(sed -n 's/^torch==\([0-9.]*\)$/\1/p' requirements.lock)"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"

if [[ -z "${PYTHON:-}" && ! -x "$PY" ]]; then
  if [[ "${GPU_STEP_CREATE_VENV:-0}" != 1 ]]; then
    echo "gpu_step: no virtual environment at $VENV (no $PY): create one with a CUDA torch==$TORCH_VERSION (see this script's header), or set VENV / PYTHON" >&2
    exit 2
  fi
  "${PYTHON3:-python3.11}" -m venv "$VENV"
  if [[ -n "${WHEELS:-}" ]]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "torch==$TORCH_VERSION"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -c requirements.lock -e .
  else
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    "$PY" -m pip install --quiet -c requirements.lock -e .
  fi
fi

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_step: $PY has torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '(none)') without a usable GPU: install a CUDA build (pip install torch==$TORCH_VERSION --index-url $TORCH_INDEX) on a machine with one" >&2
  exit 2
fi

mkdir -p "$OUT"
"$PY" - <<'EOF'
import platform, torch, transformers
print(f"gpu_step: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, {platform.node()}")
EOF
# The driver stops starting runs when the budget is spent; the outer timeout is a backstop.
timeout --kill-after=10 "$(( ${GPU_STEP_BUDGET_S:-450} + 60 ))" \
  "$PY" benchmarks/gpu_step.py --out "$OUT" --budget-s "${GPU_STEP_BUDGET_S:-450}" "$@"
