#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU: here, `bash ../shared/gpu/prepare.sh` (packs .gpu/:
# tokenizer files, the HH-RLHF file, TRL wheels, check.sh); then on the device, with .gpu carried:
#     bash .ci/gpu.sh [parts]        parts: tests bench sft variants modes hh quick (default: tests bench sft)
#     VARIANTS="ce padded" VARIANTS_S=200 bash .ci/gpu.sh variants     (.ci/sft_variants.py's names, its time limit)
# Logs, JSON and profiles go under $OUT. Each part has its own time limit; the summary says how each ended.
PARTS=${1:-"tests bench sft"}
OUT=${OUT:-/tmp/gpuout}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
export TIKTOKEN_CACHE_DIR=$(pwd)/.gpu/shared/tiktoken-cache PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
HH=$(pwd)/.gpu/shared/data/hh-rlhf/harmless-base-test.jsonl.gz
SFT="python3 bench.py --preset=gpu --only=sft --compare=False"
nvidia-smi -L | tee "$OUT/env.log"
for p in $PARTS; do
  SECONDS=0
  case $p in
  tests) timeout 120 python3 -m pytest -q -rs test_gpt.py test_rollout.py -k "cuda or cudnn" ;;  # graph decoding, no cuDNN, RLOO
  bench) timeout 240 python3 bench.py --preset=gpu --hh="$HH" --out="$OUT/bench.json" ;;  # the README's GPU table, with HF and TRL
  sft) timeout 150 $SFT --compile --compile_static --profile="$OUT/sft_static.txt" --out="$OUT/sft_static.json" &&
       timeout 200 $SFT --compile --hh="$HH" --profile="$OUT/sft_dynamic.txt" --out="$OUT/sft_dynamic.json" ;;  # as the scripts compile
  variants) timeout ${VARIANTS_S:-300} python3 .ci/sft_variants.py ${VARIANTS:-ce head} ;;  # where the compiled step's time goes, and variants of it
  modes) timeout 150 $SFT --compile --compile_static --compile_mode=reduce-overhead --out="$OUT/sft_graphs.json" ;
         timeout 400 $SFT --compile --compile_static --compile_mode=max-autotune-no-cudagraphs --out="$OUT/sft_autotune.json" ;;
  hh|quick) OUT="$OUT/shared" bash .gpu/check.sh "$p" ;;  # the README's HH-RLHF commands, the quick start (shared's script)
  esac > "$OUT/$p.out" 2>&1
  echo "== $p rc=$? ${SECONDS}s" | tee -a "$OUT/summary.log"
done
for p in $PARTS; do echo "---- $p"; grep -vE "^  ['\"]|Warning|warn" "$OUT/$p.out" | tail -14 | cut -c1-220; done
cat "$OUT/summary.log"
