#!/bin/bash
# Issue 23 evidence: a small causal LM trained on Python standard-library sources, compressed at 2x,
# 4x and 5x (whole model) with whitened SVD, TT and auto, with and without calibration; then 100
# distillation steps on the calibrated 4x and 5x models of each format and on the data-free TT ones;
# the validation perplexity of every model (docs/results.md, "Language models").
# 8x is out of reach for this model: the tied embedding / output layer and the position table stay
# dense (154,368 of 940,800 parameters), so rank 1 everywhere gives 5.79x (SVD) or 6.00x (TT);
# 5x of the whole model is already about 23x on the blocks' weights.
# Usage: benchmarks/lm_text.sh WORKDIR
#   TTC: the ttcompress command (default: ttcompress), e.g.
#        TTC="env PYTHONPATH=$PWD .venv/bin/python -m ttcompress" benchmarks/lm_text.sh /tmp/lm
#   PY: the Python that runs the setup script (default: python)
#   JOBS: how many compressions / fine-tunings run at once (default 1).
#   An existing WORKDIR/trained.pt is reused (the 400-step training is skipped).
# CPU; measured 6 Dec 2026 on 2 shared cores: training 8 min (load 6-9), then 47 min with JOBS=2
# for the compressions, fine-tunings and both reports (load 4-12).
set -e
TTC=${TTC:-ttcompress}
PY=${PY:-python}   # with torch, transformers and tokenizers (for the setup script)
JOBS=${JOBS:-1}
W=${1:?work directory}
mkdir -p "$W/corpus"
here=$(cd "$(dirname "$0")" && pwd)
cd "$W"
if [ ! -e trained.pt ]; then
  ls /usr/lib/python3.11/*.py | head -100 | xargs -I{} cp {} corpus/   # 100 files, 2.9 MB
  $PY "$here/lm_text_setup.py" .                                      # tokenizer.json + untrained GPT-2 in gpt/
  $TTC finetune gpt --data text:corpus --no-distill --epochs 1 --max-batches 400 --batch-size 16 --lr 2e-3 \
      --schedule warmup-cosine --eval-batch-size 64 -o trained.pt --overwrite
fi
DATA="--data text:corpus --tokenizer gpt"

compress() {  # compress FORMAT RATIO calib|free
  local calib="$DATA --calib-samples 128"
  [ "$3" = free ] && calib=--no-calib
  $TTC decompose trained.pt --format "$1" --target-ratio "$2" $calib -o "c-$1-$2-$3.pt" --overwrite \
      > "c-$1-$2-$3.log" 2>&1
}
finetune() {  # 100 steps of distillation from trained.pt (recorded by decompose)
  $TTC finetune "c-$1.pt" $DATA --epochs 1 --max-batches 100 --batch-size 16 --lr 1e-3 --eval-batch-size 64 \
      -o "ft-$1.pt" --overwrite > "ft-$1.log" 2>&1
}
reap() {  # wait for one background job; stop on a failure
  wait -n || { echo "a job failed (see $W/*.log)" >&2; exit 1; }
}
pool() {  # run "$@" in the background, at most $JOBS at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do reap; done
  "$@" &
}
job() {  # compress, then fine-tune when FT is given
  compress "$1" "$2" "$3"
  [ -z "$4" ] || finetune "$1-$2-$3"
}

tuned=(svd-4-calib tt-4-calib auto-4-calib svd-5-calib tt-5-calib auto-5-calib tt-4-free tt-5-free)
models=()
for r in 5 4 2; do   # the fine-tuned ones first: they are the longest chains
  for fmt in svd tt auto; do
    for c in calib free; do
      models+=(c-$fmt-$r-$c.pt)
      ft=; [[ " ${tuned[*]} " == *" $fmt-$r-$c "* ]] && ft=1
      pool job $fmt $r $c $ft
    done
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do reap; done
$TTC report trained.pt "${models[@]}" $DATA --metric perplexity --no-latency -f json -o report.json \
    --plot ppl.png --overwrite
$TTC report trained.pt $(for m in "${tuned[@]}"; do echo c-$m.pt ft-$m.pt; done) $DATA --metric perplexity \
    --no-latency -f json -o report-ft.json --overwrite
