#!/usr/bin/env bash
# bash experiments/gpu_tables.sh        (on the GPU machine: `source .device/setup.sh` first)
#
# Every table of the paper (table1, table2_3, table4, remedies) for one model on one GPU, as concurrent sweeps:
# a 135M model leaves an H100 mostly idle, so the rows run in GROUPS of `python -m linearize.sweep <table> --rows
# ...` processes side by side (each a Hydra multirun with the usual resume: a rerun skips finished rows and resumes
# unfinished ones from their stage markers and cached eval results). What the result files record is what
# `make table1 MODEL=... ARGS="..."` would record; only the scheduling differs.
#
# Budget (the LoLCATs recipe on the bundled 800-example Alpaca subset; see docs/tables.md): chunks of 4 x 512
# tokens, lr as the paper; transfer and LoRA 2 epochs for table1 and the remedies, transfer 1 epoch (the rows' own
# transfer.epochs) for tables 2-4; evaluation on the six tasks with LIMIT documents each and MMLU (5-shot, val)
# limited to MMLU_LIMIT per subject. Knobs (environment): MODEL, STEPS, LIMIT, MMLU_LIMIT, BS, SEQ, EVAL_BS, DEADLINE
# (seconds before the script stops its jobs and packs what is done; a rerun continues), OUT (where the packed
# results and logs go; $OUT on the device machine), EXTRA (more overrides for every row), RESUME (a results.tgz of
# an earlier run, e.g. on a machine since lost, with its checkpoints.tgz beside it when there is one: finished rows
# are kept, unfinished rows with their checkpoints resume where they stopped, unfinished rows without them restart,
# keeping only their base-row eval results, which do not depend on training), TRIES (sweeps
# per group: a row that failed, e.g. out of GPU memory beside the other jobs, is resumed by the next try), ONLY (an
# extended regex over "table|rows" that picks the groups to start, e.g. ONLY='table1|remedies|table4\|elu').
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
MODEL=${MODEL:-smollm2_135m}
LIMIT=${LIMIT:-500}
MMLU_LIMIT=${MMLU_LIMIT:-10}
BS=${BS:-4}
SEQ=${SEQ:-512}
EVAL_BS=${EVAL_BS:-8}  # MMLU 5-shot prompts reach ~3K tokens: at 32 the [B, T, vocab] logits alone take ~9 GiB
STEPS=${STEPS:--1}  # optimizer steps per stage; -1 = the epochs above
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-outputs/gpu_tables}
EXTRA=${EXTRA:-}
RESUME=${RESUME:-}
TRIES=${TRIES:-3}
ONLY=${ONLY:-}
mkdir -p "$OUT/logs"

if [[ -n $RESUME ]]; then
  tar xzf "$RESUME"
  [[ -f $(dirname "$RESUME")/checkpoints.tgz ]] && tar xzf "$(dirname "$RESUME")/checkpoints.tgz"
  python - "$MODEL" <<'PY'
import json, shutil, sys
from pathlib import Path
runs = Path("outputs/tables") / sys.argv[1]
base_evals = {}  # task -> a finished base-row result (the unconverted model: the same in every run)
for run in sorted(p for p in runs.glob("*/*") if p.is_dir()):
    for f in (run / "eval" / "base").glob("*.json"):
        base_evals.setdefault(f.name, f.read_text())
for run in sorted(p for p in runs.glob("*/*") if p.is_dir()):
    if (run / "metrics.json").is_file():
        print(f"resume: {run} finished, kept")
        continue
    if any(run.glob("checkpoints/**/*.safetensors")):
        print(f"resume: {run} unfinished, resumes from its checkpoints")
        continue
    kept = sorted(f.name for f in (run / "eval" / "base").glob("*.json"))
    for item in list(run.iterdir()):
        if item.name != "eval":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for item in (run / "eval").iterdir() if (run / "eval").is_dir() else []:
        if item.name != "base":
            shutil.rmtree(item)
    print(f"resume: {run} unfinished: restarts; base-row results kept: {kept or 'none'}")
for run in sorted(p for p in runs.glob("*/*") if p.is_dir()):  # base rows of other runs, same settings key
    if (run / "eval" / "base").is_dir() or run.name == "base":
        (run / "eval" / "base").mkdir(parents=True, exist_ok=True)
        for name, text in base_evals.items():
            if not (run / "eval" / "base" / name).exists():
                (run / "eval" / "base" / name).write_text(text)
PY
fi

common=(
  logger=none attention.backend=naive
  ${SMOLLM2_GGUF:+model.gguf_path=$SMOLLM2_GGUF}
  transfer.max_steps="$STEPS" transfer.batch_size="$BS" transfer.grad_accum=1 transfer.seq_len="$SEQ"
  transfer.eval_every=20 transfer.val_batches=4
  finetune.max_steps="$STEPS" finetune.batch_size="$BS" finetune.grad_accum=1 finetune.seq_len="$SEQ"
  finetune.eval_every=20 finetune.val_batches=4
  eval.limit="$LIMIT" +eval.task_limits.mmlu="$MMLU_LIMIT" eval.batch_size="$EVAL_BS"
  diagnostics.seq_len="$SEQ" diagnostics.num_sequences=8
  $EXTRA
)
two_epochs=(transfer.epochs=2 finetune.epochs=2)
# SmolLM2 has head_dim 64: the "halved" LoLCATs projection is d x 32 there (docs/tables.md, Projections).
halved=()
[[ $MODEL == smollm2_135m ]] && halved=(feature_map.feature_dim=32)

# one line per process: table, rows, extra overrides
GROUPS_=(
  "table1|lolcats|${two_epochs[*]}"
  "table2_3|base,no_attention|${halved[*]}"
  "table2_3|weights_square,weights_halved|${halved[*]}"
  "table2_3|outputs_square,outputs_halved|${halved[*]}"
  "table2_3|hybrid_outputs_square,hybrid_outputs_halved|${halved[*]}"
  "table4|base,softmax|"
  "table4|exp,relu|"
  "table4|elu,identity|"
  "remedies|base,inference_hybrid|${two_epochs[*]}"
  "remedies|hedgecats|${two_epochs[*]}"
  "remedies|ssd|${two_epochs[*]}"
)

pack() {  # results.tgz: everything a result or a report needs; checkpoints.tgz: the trained weights, for RESUME
  tar czf "$OUT/results.tgz.tmp" \
    --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='wandb' \
    experiments/results/"$MODEL" outputs/tables/"$MODEL" 2>/dev/null
  mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  find outputs/tables/"$MODEL" -name '*.safetensors' -print0 2>/dev/null | tar czf "$OUT/checkpoints.tgz.tmp" --null -T -
  mv -f "$OUT/checkpoints.tgz.tmp" "$OUT/checkpoints.tgz"
}

kill_tree() {  # a group's subshell, its sweep and the sweep's training process
  local c
  for c in $(pgrep -P "$1"); do kill_tree "$c"; done
  kill -TERM "$1" 2>/dev/null
}

start=$(date +%s)
pids=()
for g in "${GROUPS_[@]}"; do
  IFS='|' read -r table rows extra <<<"$g"
  [[ -n $ONLY ]] && ! grep -Eq "$ONLY" <<<"$table|$rows" && continue
  log="$OUT/logs/${table}_${rows//,/_}.log"
  (
    for ((try = 1; try <= TRIES; try++)); do
      # shellcheck disable=SC2086
      python -m linearize.sweep "$table" --model "$MODEL" --rows "$rows" "${common[@]}" $extra >>"$log" 2>&1 && break
      echo "sweep $table [$rows]: try $try ended with failed rows" >>"$log"
    done
  ) &
  pids+=($!)
  echo "started $table [$rows] (pid $!), log $log"
done

while true; do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  elapsed=$(($(date +%s) - start))
  done_rows=$(find experiments/results/"$MODEL" -name '*.json' 2>/dev/null | wc -l)
  echo "[$elapsed s] running $alive / ${#pids[@]} sweeps, $done_rows result files; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  pack
  ((alive == 0)) && break
  if ((elapsed > DEADLINE)); then
    echo "deadline ${DEADLINE}s reached: stopping the sweeps (a rerun resumes them)"
    for p in "${pids[@]}"; do kill_tree "$p"; done
    sleep 5
    break
  fi
  sleep 30
done
pack
for t in table1 table2_3 table4 remedies; do python -m linearize.tables render --model "$MODEL" "$t" >/dev/null 2>&1; done
python -m linearize.tables list --model "$MODEL" 2>&1 | tee "$OUT/status.txt"
for f in "$OUT"/logs/*.log; do echo "== $f"; grep -E "Error|error:|Traceback|failed" "$f" | tail -5; done
