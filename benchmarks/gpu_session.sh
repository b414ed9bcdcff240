#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md still owes (issues 9 and 10), in three parts that each fit in
# one 10-minute call of a lent H100. Not part of eqxgpt; a record of how the figures are made.
#
#   bash benchmarks/gpu_session.sh steps    # step variants, nanoGPT beside them, decoding (~7 min)
#   bash benchmarks/gpu_session.sh train    # shakespeare_char: 3 seeds x 5000 steps, the loop alone (~9 min)
#   bash benchmarks/gpu_session.sh suite    # the test suite on the GPU (~8 min)
#
# Offline machines: put Tiny Shakespeare and tiktoken's GPT-2 files in .gpu/ (cp -r
# ../shared/data/tinyshakespeare ../shared/data/tiktoken .gpu/) and, where tensorboardX is
# missing, its wheel in .whl/ (pip download --no-deps tensorboardX -d .whl). Output goes to
# $OUT (default /tmp/gpu_session).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.gpu/tiktoken}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
input=.gpu/tinyshakespeare/input.txt
[ -f data/shakespeare_char/meta.json ] || python3 prepare_shakespeare.py --input "$input" >/dev/null
[ -f data/shakespeare/meta.json ] || python3 prepare_shakespeare.py --input "$input" --tokenizer gpt2 >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/machine.txt"
date -u | tee -a "$OUT/machine.txt"

case "${1:-}" in
steps)
  python3 benchmarks/gpu_variants.py --shape=shakespeare_char --data_dir=data/shakespeare_char --steps=50 \
    "" "dropout=rbg" "dropout=bits" "model.attn_dropout=0.0" "embed=one-hot" 2>&1 | tee "$OUT/char_steps.txt"
  python3 benchmarks/torch_nanogpt.py --device=cuda --shape=shakespeare_char --benchmark_steps=50 2>&1 | tail -2 | tee -a "$OUT/char_steps.txt"
  python3 benchmarks/gpu_variants.py --shape=gpt2 --data_dir=data/shakespeare --steps=15 --warmup=2 \
    "" "norm=bf16-apply" "model.qk_norm=False" 2>&1 | tee "$OUT/gpt2_steps.txt"
  python3 benchmarks/torch_nanogpt.py --device=cuda --shape=gpt2 --data_dir=data/shakespeare --benchmark_steps=15 2>&1 | tail -2 | tee -a "$OUT/gpt2_steps.txt"
  for n in 1 32; do
    python3 bench.py --config=openwebtext --decode --num_samples=$n 2>&1 | tee -a "$OUT/decode.txt"
  done
  python3 bench.py --config=shakespeare_char --decode --num_samples=1 2>&1 | tee -a "$OUT/decode.txt"
  ;;
train)
  # the three seeds at once (their losses, not their times, are the result) ...
  for seed in 1337 1338 1339; do
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 launch.py --config=shakespeare_char --seed=$seed \
      --rundir=runs/char_seed$seed > "$OUT/char_seed$seed.txt" 2>&1 &
  done
  wait
  grep -h "eval" "$OUT"/char_seed*.txt | tail -n 3
  # ... then the loop alone, for its ms/step
  python3 launch.py --config=shakespeare_char --rundir=runs/char_loop --max_steps=1000 \
    --eval_interval=1000 2>&1 | tail -n 4 | tee "$OUT/char_loop.txt"
  python3 sample.py --rundir=runs/char_seed1337 --num_samples=1 --max_new_tokens=500 > "$OUT/char_sample.txt"
  ;;
suite)
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 560 python3 -m pytest -q tests -p no:cacheprovider \
    2>&1 | tee "$OUT/suite.txt"
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh steps|train|suite" >&2
  exit 2
  ;;
esac
