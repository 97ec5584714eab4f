#!/usr/bin/env bash
# The Multi30k study of README "Results" (issue 13): per seed, one BC policy, then each row started from it.
#   scripts/multi30k_study.sh 0 1 2
#   ROWS="rest control rest_norefs n16 mix50 loss_gold" scripts/multi30k_study.sh 0 1 2
#   BC=bc_half ROWS="half_same half_new" scripts/multi30k_study.sh 0 1 2
# Rows are configs/experiments/multi30k_study/<row>.gin (default: rest control; ROWS= trains the BC alone), each
# started from the seed's BC run, configs/experiments/multi30k_study/<BC>.gin (default: bc). Arguments after the seeds
# (--gin.X=Y) go to every run. Runs land in $STUDY_DIR/s<seed>/<row> (default runs/m30k_study); a rerun skips
# finished stages. The table over seeds: python scripts/study_table.py runs/m30k_study
set -euo pipefail
seeds=()
while [[ $# -gt 0 && "$1" != --* ]]; do seeds+=("$1"); shift; done
if [[ ${#seeds[@]} -eq 0 ]]; then
  echo "usage: $0 SEED [SEED ...] [--gin.X=Y ...]" >&2
  exit 2
fi
dir=${STUDY_DIR:-runs/m30k_study}
bc=${BC:-bc}
for seed in "${seeds[@]}"; do
  python -m rest_jax.main rest --gin_file="experiments/multi30k_study/$bc.gin" \
    --gin.MODEL_DIR="'$dir/s$seed/$bc'" --gin.run_rest.seed="$seed" "$@"
  for row in ${ROWS-rest control}; do
    python -m rest_jax.main rest --gin_file="experiments/multi30k_study/$row.gin" \
      --gin.MODEL_DIR="'$dir/s$seed/$row'" --gin.run_rest.seed="$seed" \
      --gin.run_rest.bc_run="'$dir/s$seed/$bc'" "$@"
  done
done
