#!/usr/bin/env bash
# ReST against online RL and DPO-from-Grow at comparable cost on the demo pair (issue 15; ReST Sec. 5): per seed,
# one BC policy, then each method started from it, so that every method of a seed is paired with one BC.
#   scripts/cost_comparison.sh 0 1 2
#   python scripts/cost_table.py runs/demo_cost
# Methods: rest (G=1, I=0..2: experiments/demo.gin), dpo (runs/dpo.gin at Improve rate $DPO_LR, default 2e-5,
# where the demo's 2e-3 collapses DPO, README "Online RL"; patience 3, so that its slow rise runs the stage's
# 300 steps), grpo and ppo (runs/grpo.gin, runs/ppo.gin:
# 60 iterations x 32 sources x 4 samples, as many reward calls as Grow's 2,000 sources x 4 samples). Arguments
# after the seeds (--gin.X=Y) go to every run. Runs land in $COST_DIR/s<seed>/<method> (default runs/demo_cost);
# a rerun skips finished stages.
set -euo pipefail
seeds=()
while [[ $# -gt 0 && "$1" != --* ]]; do seeds+=("$1"); shift; done
if [[ ${#seeds[@]} -eq 0 ]]; then
  echo "usage: $0 SEED [SEED ...] [--gin.X=Y ...]" >&2
  exit 2
fi
dir=${COST_DIR:-runs/demo_cost}
for seed in "${seeds[@]}"; do
  run() {  # method, subcommand, then gin files that go after the experiment's
    local method=$1 command=$2; shift 2
    python -m rest_jax.main "$command" --gin_file=experiments/demo.gin "$@" \
      --gin.MODEL_DIR="'$dir/s$seed/$method'" "${extra[@]}"
  }
  extra=(--gin.run_rest.seed="$seed" --gin.run_rest.best_of_n_ns="()" "$@")
  run bc rest --gin.run_rest.num_grow_steps=0
  extra+=(--gin.run_rest.bc_run="'$dir/s$seed/bc'")
  run rest rest
  run dpo rest --gin_file=runs/dpo.gin --gin.improve/learning_rate_schedule.base_learning_rate="${DPO_LR:-2e-5}" \
    --gin.improve_step.patience=3
  for algorithm in grpo ppo; do
    extra=(--gin.online.seed="$seed" --gin.online.bc_run="'$dir/s$seed/bc'" "$@")
    run "$algorithm" online --gin_file=runs/$algorithm.gin
  done
done
