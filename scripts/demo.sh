#!/usr/bin/env bash
# The main job, end to end on CPU: build the tiny tokenizer and datasets, pretrain the tiny
# Llama on 2 msrun workers (data_parallel 2, de-redundant safetensors checkpoints), merge them
# offline (mindformers-st merge) into complete weights, then
# predict on 2 workers with model_parallel 2 from the merged weights (cut online).
#   bash scripts/setup.sh && bash scripts/demo.sh
# Env: OUT (default output/demo: the user guide's flows write output/<flow>), DEMO_STEPS (default 40), MF_LAUNCH_TIMEOUT (default 900 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "error: $PY missing; run: bash scripts/setup.sh" >&2; exit 1; }
OUT=${OUT:-output/demo}
TINY=$OUT/tiny
STEPS=${DEMO_STEPS:-40}
export MF_LAUNCH_TIMEOUT=${MF_LAUNCH_TIMEOUT:-900}
ASSETS=mindformers_st/data/assets

step() { echo; echo "=== $* ==="; }
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
fail() { echo "demo: FAILED at: $*" >&2; exit 1; }

step "1/4 tokenizer and datasets -> $TINY"
mkdir -p "$TINY"
"$PY" -m mindformers_st.data train-tokenizer --input "$ASSETS/tiny_corpus.txt" --vocab_size 512 \
  --output "$TINY/tokenizer.json" || fail "train-tokenizer"
"$PY" -m mindformers_st.data pretrain --input "$ASSETS/tiny_corpus.txt" --tokenizer "$TINY/tokenizer.json" \
  --seq_length 64 --output "$TINY/wiki.mindrecord" || fail "pretrain dataset"
"$PY" -m mindformers_st.data finetune --input "$ASSETS/tiny_alpaca.json" --tokenizer "$TINY/tokenizer.json" \
  --seq_length 192 --output "$TINY/alpaca.mindrecord" || fail "finetune dataset"

step "2/4 pretrain the tiny Llama: 2 workers, data_parallel 2, $STEPS steps"
rm -rf "$OUT/checkpoint" "$OUT/strategy"
bash scripts/msrun_launcher.sh "run_mindformer.py --config configs/llama2/pretrain_llama2_tiny.yaml \
  --train_dataset_dir $TINY/wiki.mindrecord --use_parallel True --run_mode train --output_dir $OUT \
  --processor.tokenizer.tokenizer_file $TINY/tokenizer.json --runner_config.train_steps $STEPS \
  --callbacks.1.save_checkpoint_steps $STEPS" \
  2 "$(free_port)" "$OUT/msrun_log_pretrain" True 600 || fail "pretrain"
grep -h "training done" "$OUT/msrun_log_pretrain/worker_0.log" || true

step "3/4 merge the de-redundant rank files offline, predict on 2 workers (model_parallel 2)"
"$ROOT/.venv/bin/mindformers-st" merge "$OUT/checkpoint" "$OUT/merged" --overwrite --no-progress \
  || fail "merge"
bash scripts/msrun_launcher.sh "run_mindformer.py --config configs/llama2/predict_llama2_tiny.yaml \
  --run_mode predict --use_parallel True --load_checkpoint $OUT/merged --auto_trans_ckpt True \
  --output_dir $OUT \
  --processor.tokenizer.tokenizer_file $TINY/tokenizer.json \
  --predict_data 'I love Beijing, because' 'The red fox lives'" \
  2 "$(free_port)" "$OUT/msrun_log_predict" True 600 || fail "predict"

step "4/4 what was written where"
echo "tokenizer and data:     $TINY/{tokenizer.json,wiki.mindrecord,alpaca.mindrecord}"
echo "strategy files:         $(ls "$OUT"/strategy/ckpt_strategy_rank_*.ckpt 2>/dev/null | tr '\n' ' ')"
echo "checkpoints:            $(find "$OUT/checkpoint" -name '*.safetensors' 2>/dev/null | sort | tr '\n' ' ')"
echo "merged (complete):      $OUT/merged/{model-*.safetensors,param_name_map.json,hyper_param.safetensors}"
echo "predictions:            $OUT/predict/results.json"
echo "worker logs:            $OUT/msrun_log_pretrain/ $OUT/msrun_log_predict/"
[ -s "$OUT/predict/results.json" ] || fail "no $OUT/predict/results.json"
echo "demo: OK"
