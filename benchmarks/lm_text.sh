#!/bin/bash
# Issue 23 evidence: a small causal LM trained on Python standard-library sources, compressed at 2x
# and 4x (whole model) with whitened SVD, TT and auto, with and without calibration, then the
# validation perplexity of every model (docs/results.md, "Language models").
# Usage: benchmarks/lm_text.sh WORKDIR   (CPU; about 20 min training + 15 min compression on 2 busy cores)
set -e
W=${1:?work directory}
mkdir -p "$W/corpus"
ls /usr/lib/python3.11/*.py | head -100 | xargs -I{} cp {} "$W/corpus/"   # 100 files, 2.9 MB
python "$(dirname "$0")/lm_text_setup.py" "$W"                             # tokenizer.json + untrained GPT-2 in $W/gpt
cd "$W"
ttcompress finetune gpt --data text:corpus --no-distill --epochs 1 --max-batches 400 --batch-size 16 --lr 2e-3 \
    --schedule warmup-cosine --eval-batch-size 64 -o trained.pt --overwrite
DATA="--data text:corpus --tokenizer gpt"
models=()
for fmt in svd tt auto; do
  for r in 2 4; do
    ttcompress decompose trained.pt --format $fmt --target-ratio $r $DATA --calib-samples 128 -o c-$fmt-$r-calib.pt --overwrite
    ttcompress decompose trained.pt --format $fmt --target-ratio $r --no-calib -o c-$fmt-$r-free.pt --overwrite
    models+=(c-$fmt-$r-calib.pt c-$fmt-$r-free.pt)
  done
done
ttcompress report trained.pt "${models[@]}" $DATA --metric perplexity --no-latency -f json -o report.json \
    --plot ppl.png --overwrite
for m in c-svd-4-calib c-tt-4-calib c-tt-4-free; do   # then 100 steps of distillation from trained.pt
  ttcompress finetune $m.pt $DATA --epochs 1 --max-batches 100 --batch-size 16 --lr 1e-3 --eval-batch-size 64 \
      -o ft-${m#c-}.pt --overwrite
done
ttcompress report trained.pt c-svd-4-calib.pt ft-svd-4-calib.pt c-tt-4-calib.pt ft-tt-4-calib.pt c-tt-4-free.pt \
    ft-tt-4-free.pt $DATA --metric perplexity --no-latency -f json -o report-ft.json --overwrite
