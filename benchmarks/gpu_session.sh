#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md owes, in parts that fit one 10-minute call of a lent GPU, run in
# the order given and cut at a shared deadline. Not part of eqxgpt; a record of how the figures
# are made.
#
#   bash benchmarks/gpu_session.sh steps suite   # GPT-2 124M and shakespeare_char against nanoGPT, then the suite
#   bash benchmarks/gpu_session.sh decode        # cached against naive decoding, batch 1 and 32
#   bash benchmarks/gpu_session.sh train         # shakespeare_char: 3 seeds x 5000 steps
#   bash benchmarks/gpu_session.sh gaps          # GPT-2 124M: candidate fixes of the gap
#   bash benchmarks/gpu_session.sh race          # shakespeare_char: wall to nanoGPT's best val
#   bash benchmarks/gpu_session.sh determinism   # GPT-2 124M: bitwise reruns and their cost
#
# Offline machines: the data that ../shared holds goes in .gpu/shared (mkdir -p .gpu/shared &&
# cp -r ../shared/data .gpu/shared/ && chmod -R u+w .gpu: a read-only copy of tiktoken's cache
# was not found there), prepared datasets in data/ (prepare_shakespeare.py, with and without
# --tokenizer gpt2), and tensorboardX's wheel in .whl/ where it is missing (pip download
# --no-deps tensorboardX -d .whl); carry .gpu, data and .whl. `race` runs nanoGPT's train.py
# from .gpu/nanoGPT (its train.py, model.py, configurator.py, config/train_shakespeare_char.py and
# data/shakespeare_char as its prepare.py writes it). Output goes to $OUT
# (default /tmp/gpu_session); DEADLINE_S (default 560) bounds the whole script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
end=$((SECONDS + ${DEADLINE_S:-560}))
export PYTHONUNBUFFERED=1 EQXGPT_SHARED=$PWD/.gpu/shared
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.gpu/shared/data/tiktoken}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
input=.gpu/shared/data/tinyshakespeare/input.txt
[ -f data/shakespeare_char/meta.json ] || python3 prepare_shakespeare.py --input "$input" >/dev/null
[ -f data/shakespeare/meta.json ] || python3 prepare_shakespeare.py --input "$input" --tokenizer gpt2 >/dev/null
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u
  python3 -c "import jax, equinox, optax, torch; print('jax', jax.__version__, 'equinox',
equinox.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"; } 2>&1 | tee "$OUT/machine.txt"

left() { echo $((end - SECONDS)); }  # seconds to the deadline
part() {  # part NAME LOGFILE COMMAND...: runs the command with what is left of the deadline
  local name=$1 log=$2; shift 2
  if [ "$(left)" -le 20 ]; then echo "skipped $name: deadline" | tee -a "$log"; return; fi
  echo "== $name ($(left) s left)" | tee -a "$log"
  timeout -s INT -k 15 "$(left)" "$@" 2>&1 | tee -a "$log"  # INT: pytest still writes its report
}

for what in "$@"; do
  case "$what" in
  steps)
    # GPT-2 124M on real GPT-2 tokens: eqxgpt's step, the variants that would explain a gap, Muon
    part gpt2-variants "$OUT/gpt2.txt" python3 benchmarks/gpu_variants.py --shape=gpt2 \
      --data_dir=data/shakespeare --steps=20 --warmup=3 "" "model.qk_norm=False" "optimizer=muon"
    part gpt2-nanogpt "$OUT/gpt2.txt" python3 benchmarks/torch_nanogpt.py --device=cuda --shape=gpt2 \
      --data_dir=data/shakespeare --benchmark_steps=20
    part gpt2-bench "$OUT/gpt2.txt" python3 bench.py --config=openwebtext --grad_accum=1 \
      --data_dir=data/shakespeare --steps=10 --profile=/tmp/profile_gpt2
    part char-bench "$OUT/char.txt" python3 bench.py --config=shakespeare_char --steps=50
    part char-muon "$OUT/char.txt" python3 bench.py --config=shakespeare_char --steps=50 \
      --optimizer=muon --model.mlp_activation=relu2
    part char-nanogpt "$OUT/char.txt" python3 benchmarks/torch_nanogpt.py --device=cuda \
      --shape=shakespeare_char --benchmark_steps=50
    ;;
  decode)
    for n in 1 32; do
      part "decode-gpt2-$n" "$OUT/decode.txt" python3 bench.py --config=openwebtext --decode --num_samples=$n
    done
    part decode-char "$OUT/decode.txt" python3 bench.py --config=shakespeare_char --decode --num_samples=1
    ;;
  train)
    for seed in 1337 1338 1339; do  # at once: their losses, not their times, are the result
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout "$(left)" python3 launch.py --config=shakespeare_char \
        --seed=$seed --rundir=runs/char_seed$seed > "$OUT/char_seed$seed.txt" 2>&1 &
    done
    wait
    grep -h "eval" "$OUT"/char_seed*.txt | tail -n 3
    ;;
  gaps)  # issue 27's candidates, each against today's step in the same process
    part gpt2-gaps "$OUT/gaps.txt" python3 benchmarks/gpu_variants.py --shape=gpt2 \
      --data_dir=data/shakespeare --steps=20 --warmup=3 "" "norm=bf16-apply" "rope=no-concatenate" \
      "norm=bf16-apply+rope=no-concatenate"
    part gpt2-nanogpt "$OUT/gaps.txt" python3 benchmarks/torch_nanogpt.py --device=cuda --shape=gpt2 \
      --data_dir=data/shakespeare --benchmark_steps=20
    ;;
  race)  # nanoGPT's config as written, then eqxgpt's GPU config with AdamW and with the CPU recipe
    recipe="--optimizer=muon --muon_learning_rate=0.01 --normuon=True --muon_preconditioning=aol"
    recipe="$recipe --muon_ns_steps=4 --model.mlp_activation=relu2 --model.value_embeds=True"
    recipe="$recipe --model.bigram_embed=True"
    part race "$OUT/race.txt" python3 benchmarks/time_to_loss.py --nanogpt=.gpu/nanoGPT \
      --nanogpt_config=gpu --target=1.466 --out=/tmp/race \
      --run "eqxgpt AdamW=python3 launch.py --config=shakespeare_char" \
      --run "eqxgpt Muon recipe=python3 launch.py --config=shakespeare_char $recipe"
    ;;
  determinism)  # 3 steps twice; cuDNN attention swapped for XLA's; then XLA's deterministic kernels
    part det-default "$OUT/determinism.txt" python3 benchmarks/gpu_variants.py --shape=gpt2 \
      --data_dir=data/shakespeare --determinism "" "model.attention=xla"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" part det-flag "$OUT/determinism.txt" \
      python3 benchmarks/gpu_variants.py --shape=gpt2 --data_dir=data/shakespeare --determinism ""
    part det-cost "$OUT/determinism.txt" python3 benchmarks/gpu_variants.py --shape=gpt2 \
      --data_dir=data/shakespeare --steps=20 --warmup=3 ""
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" part det-flag-cost \
      "$OUT/determinism.txt" python3 benchmarks/gpu_variants.py --shape=gpt2 \
      --data_dir=data/shakespeare --steps=20 --warmup=3 ""
    ;;
  suite)  # the tests spread over 8 processes; the junit file names each test's outcome
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    part suite "$OUT/suite.txt" python3 -m pytest -v tests \
      -p no:cacheprovider -n 8 --timeout=300 -rfE --junitxml="$OUT/suite.xml"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh steps|gaps|decode|train|race|determinism|suite ..." >&2
    exit 2
    ;;
  esac
done
