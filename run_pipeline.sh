#!/usr/bin/env bash
# The pipeline, stage by stage, each a separate process. Stages so far: 0 data, 1 TD3+BC pretraining,
# 2 differential-evolution perturbations, 3 fine-tuning (adversarial + adaptive curriculum, normal, from scratch).
#   bash run_pipeline.sh                 # small embedded default: minutes on 2 CPU cores, no internet
#   SCALE=paper bash run_pipeline.sh     # D4RL-size datasets (1M transitions) and 5M pretraining updates
# Overrides: ENV_ID (Hopper-v5), SEED (1), EPSILON (0.3), MINARI_DATASETS_PATH (Minari's store, default ~/.minari/datasets).
set -euo pipefail
cd "$(dirname "$0")"
ENV_ID=${ENV_ID:-Hopper-v5}
SEED=${SEED:-1}
SCALE=${SCALE:-small}
ENV_NAME=$(echo "${ENV_ID%%-*}" | tr '[:upper:]' '[:lower:]')

case "$SCALE" in
  small)  # a weak "medium" (return ~200 where D4RL's Hopper medium is ~1400): enough to exercise every stage
    NS=local-quick
    COLLECT=(--levels random medium --num-transitions 50000 --max-train-steps 40000 --learning-starts 5000
             --eval-freq 5000 --eval-episodes 5 --ref-episodes 20 --medium-target-return 200)
    PRETRAIN=(--total-steps 10000 --eval-freq 2500 --eval-episodes 5)
    DE=(--num-perturbations 3 --maxiter 10)
    FINETUNE=(--total-steps 20000 --eval-freq 5000 --eval-episodes 5)
    SCRATCH_STARTS=5000 ;;
  paper)
    NS=local
    COLLECT=()
    PRETRAIN=(--total-steps 5000000)
    DE=()
    FINETUNE=(--total-steps 1000000)
    SCRATCH_STARTS=25000 ;;
  *) echo "error: SCALE must be small or paper (got '$SCALE')" >&2; exit 2 ;;
esac
DATASET="$NS/$ENV_NAME/medium-v0"
RUN="runs/${DATASET//\//-}__td3_bc_offline__$SEED"

echo "== stage 0: datasets ($SCALE scale) -> $DATASET"
python collect_dataset.py --env-id "$ENV_ID" --namespace "$NS" --seed "$SEED" --overwrite "${COLLECT[@]}"
echo "== stage 1: TD3+BC pretraining -> $RUN/checkpoint.pt"
python td3_bc_offline.py --dataset-id "$DATASET" --seed "$SEED" --overwrite "${PRETRAIN[@]}"
echo "== stage 2: differential-evolution perturbations -> $RUN/perturbations.npz"
python de_perturbations.py --checkpoint "$RUN/checkpoint.pt" --epsilon "${EPSILON:-0.3}" "${DE[@]}"
echo "== stage 3: fine-tuning from $RUN/checkpoint.pt -> runs/${ENV_ID}__td3_adv_finetune__*__$SEED/"
FT=(python td3_adv_finetune.py --checkpoint "$RUN/checkpoint.pt" --seed "$SEED" --overwrite "${FINETUNE[@]}")
"${FT[@]}" --finetune-condition adversarial --curriculum adaptive
"${FT[@]}" --finetune-condition normal --curriculum fixed
"${FT[@]}" --finetune-condition adversarial --curriculum adaptive --init scratch --learning-starts "$SCRATCH_STARTS"
echo "== done: pretraining $RUN/, perturbations $RUN/perturbations.npz (+ .png), fine-tuning runs/${ENV_ID}__td3_adv_finetune__*__$SEED/"
