#!/usr/bin/env bash
# The one-command demo: a one-seed study (study.py) of the whole method, each stage a separate process on local Ray:
#   0 data -> 1 TD3+BC pretraining -> 2 DE perturbations -> 3 fine-tuning (adversarial + adaptive curriculum,
#   normal, from scratch) -> 4 evaluation of every policy -> report (tables and plots in $RESULTS). One seed is a smoke
#   test: the report shows the paired differences but judges no claim (a verdict needs at least 8 paired seeds).
#   bash run_pipeline.sh                 # small embedded default: about 10 minutes on 2 CPU cores, no internet
#   SCALE=medium bash run_pipeline.sh    # a D4RL-level medium dataset and longer budgets (hours)
#   SCALE=paper bash run_pipeline.sh     # D4RL-size datasets, 5M pretraining updates, 1M fine-tuning steps
#   SCALE=tiny bash run_pipeline.sh      # seconds per stage: checks that every stage runs (the test suite uses it)
# Overrides: ENV_ID (Hopper-v5), SEED (1), EPSILON (0.3), RESULTS (results/demo-$SCALE-<env>, ignored by git),
# MINARI_DATASETS_PATH (Minari's store, default ~/.minari/datasets). Outputs go under the current directory.
#   RESUME=1 bash run_pipeline.sh        # after a crash: finished stages are skipped, interrupted ones --resume
# More seeds, conditions and envs: `python study.py --help`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ENV_ID=${ENV_ID:-Hopper-v5}
SEED=${SEED:-1}
SCALE=${SCALE:-small}
ENV_NAME=$(echo "${ENV_ID%%-*}" | tr '[:upper:]' '[:lower:]')
RESULTS=${RESULTS:-results/demo-$SCALE-$ENV_NAME}
case "$SCALE" in
  tiny|small|medium|paper) ;;
  *) echo "error: SCALE must be tiny, small, medium or paper (got '$SCALE')" >&2; exit 2 ;;
esac
FRESH=(--overwrite); [ "${RESUME:-0}" = 1 ] && FRESH=()
exec python "$HERE/study.py" --scale "$SCALE" --env-ids "$ENV_ID" --seeds "$SEED" --epsilon "${EPSILON:-0.3}" \
  --finetune-conditions normal --curricula adaptive --results-dir "$RESULTS" "${FRESH[@]}"
