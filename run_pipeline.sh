#!/usr/bin/env bash
# The whole method, stage by stage, each stage a separate process:
#   0 data -> 1 TD3+BC pretraining -> 2 DE perturbations -> 3 fine-tuning (adversarial + adaptive curriculum,
#   normal, from scratch) -> 4 evaluation matrix (tables and plots in $RESULTS).
#   bash run_pipeline.sh                 # small embedded default: about 9 minutes on 2 CPU cores, no internet
#   SCALE=paper bash run_pipeline.sh     # D4RL-size datasets, 5M pretraining updates, 1M fine-tuning steps
#   SCALE=tiny bash run_pipeline.sh      # seconds: checks that every stage runs (the test suite uses it)
# Overrides: ENV_ID (Hopper-v5), SEED (1), EPSILON (0.3), RESULTS (results/$SCALE-<env>),
# MINARI_DATASETS_PATH (Minari's store, default ~/.minari/datasets). Outputs go under the current directory.
#   RESUME=1 bash run_pipeline.sh        # after a crash: finished stages are skipped, interrupted ones --resume
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ENV_ID=${ENV_ID:-Hopper-v5}
SEED=${SEED:-1}
SCALE=${SCALE:-small}
ENV_NAME=$(echo "${ENV_ID%%-*}" | tr '[:upper:]' '[:lower:]')
RESULTS=${RESULTS:-results/$SCALE-$ENV_NAME}
RESUME=${RESUME:-0}
# with RESUME=1: "--resume" if the stage left resume state at $1, else "--overwrite" (a fresh start)
fresh_or_resume() { if [ "$RESUME" = 1 ] && [ -e "$1" ]; then echo --resume; else echo --overwrite; fi; }

case "$SCALE" in
  tiny)
    NS=local-tiny
    COLLECT=(--levels medium --num-transitions 1000 --max-train-steps 1500 --learning-starts 500 --eval-freq 500
             --eval-episodes 2 --ref-episodes 3 --medium-target-return 50 --max-episode-steps 100)
    PRETRAIN=(--total-steps 200 --eval-freq 100 --eval-episodes 2 --batch-size 64)
    DE=(--num-perturbations 1 --popsize 4 --maxiter 2 --de-episodes 2 --eval-episodes 2 --random-draws 2 --num-workers 1)
    FINETUNE=(--total-steps 300 --eval-freq 150 --eval-episodes 2 --batch-size 64)
    SCRATCH_STARTS=100
    MATRIX=(--eval-episodes 2 --num-workers 1) ;;
  small)  # a weak "medium" (return ~200 where D4RL's Hopper medium is ~1400): enough to exercise every stage
    NS=local-quick
    COLLECT=(--levels random medium --num-transitions 50000 --max-train-steps 40000 --learning-starts 5000
             --eval-freq 5000 --eval-episodes 5 --ref-episodes 20 --medium-target-return 200)
    PRETRAIN=(--total-steps 10000 --eval-freq 2500 --eval-episodes 5)
    DE=(--num-perturbations 3 --maxiter 10)
    FINETUNE=(--total-steps 20000 --eval-freq 5000 --eval-episodes 5)
    SCRATCH_STARTS=5000
    MATRIX=(--eval-episodes 10) ;;
  paper)
    NS=local
    COLLECT=()
    PRETRAIN=(--total-steps 5000000)
    DE=()
    FINETUNE=(--total-steps 1000000)
    SCRATCH_STARTS=25000
    MATRIX=() ;;
  *) echo "error: SCALE must be tiny, small or paper (got '$SCALE')" >&2; exit 2 ;;
esac
DATASET="$NS/$ENV_NAME/medium-v0"
RUN="runs/${DATASET//\//-}__td3_bc_offline__$SEED"
FT_RUN="runs/${ENV_ID}__td3_adv_finetune"

STORE=${MINARI_DATASETS_PATH:-$HOME/.minari/datasets}
COLLECT_STATE="runs/collect_dataset__$NS-$ENV_NAME-v0/state.pt"

echo "== stage 0: datasets ($SCALE scale) -> $DATASET"
if [ "$RESUME" = 1 ] && [ ! -e "$COLLECT_STATE" ] && [ -d "$STORE/$DATASET" ]; then
  echo "(RESUME=1: $DATASET exists; skipped)"
else
  RESUME_FLAG=(); [ "$(fresh_or_resume "$COLLECT_STATE")" = --resume ] && RESUME_FLAG=(--resume)
  python "$HERE/collect_dataset.py" --env-id "$ENV_ID" --namespace "$NS" --seed "$SEED" --overwrite "${RESUME_FLAG[@]}" "${COLLECT[@]}"
fi
echo "== stage 1: TD3+BC pretraining -> $RUN/checkpoint.pt"
python "$HERE/td3_bc_offline.py" --dataset-id "$DATASET" --seed "$SEED" "$(fresh_or_resume "$RUN/checkpoint.pt")" "${PRETRAIN[@]}"
echo "== stage 2: differential-evolution perturbations -> $RUN/perturbations.npz"
if [ "$RESUME" = 1 ] && [ ! -e "$RUN/perturbations.npz.state.npz" ] && [ -e "$RUN/perturbations.npz" ]; then
  echo "(RESUME=1: $RUN/perturbations.npz exists; skipped)"
else
  RESUME_FLAG=(); [ "$(fresh_or_resume "$RUN/perturbations.npz.state.npz")" = --resume ] && RESUME_FLAG=(--resume)
  python "$HERE/de_perturbations.py" --checkpoint "$RUN/checkpoint.pt" --epsilon "${EPSILON:-0.3}" "${RESUME_FLAG[@]}" "${DE[@]}"
fi
echo "== stage 3: fine-tuning from $RUN/checkpoint.pt -> ${FT_RUN}__*__$SEED/"
for spec in offline-adversarial-adaptive offline-normal-fixed scratch-adversarial-adaptive; do
  IFS=- read -r INIT COND CURR <<< "$spec"
  EXTRA=(); [ "$INIT" = scratch ] && EXTRA=(--learning-starts "$SCRATCH_STARTS")
  NAME="${FT_RUN#runs/}__${spec}__$SEED"
  python "$HERE/td3_adv_finetune.py" --checkpoint "$RUN/checkpoint.pt" --seed "$SEED" "$(fresh_or_resume "runs/$NAME/state.pt")" \
    "${FINETUNE[@]}" --init "$INIT" --finetune-condition "$COND" --curriculum "$CURR" --run-name "$NAME" "${EXTRA[@]}"
done
echo "== stage 4: evaluation matrix -> $RESULTS/"
python "$HERE/evaluate_matrix.py" --output-dir "$RESULTS" "${MATRIX[@]}" --checkpoints "$RUN" \
  "${FT_RUN}__offline-adversarial-adaptive__$SEED" "${FT_RUN}__offline-normal-fixed__$SEED" \
  "${FT_RUN}__scratch-adversarial-adaptive__$SEED"
echo "== done: table $RESULTS/matrix.md, CSV $RESULTS/matrix.csv, plots $RESULTS/{heatmap,curves,q_trajectory}.png"
