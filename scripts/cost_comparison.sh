#!/usr/bin/env bash
# ReST against online RL and DPO-from-Grow at comparable cost (issue 15; ReST Sec. 5): per seed, one BC policy,
# then each method started from it, so that every method of a seed is paired with one BC.
#   scripts/cost_comparison.sh 0 1 2
#   python scripts/cost_table.py runs/demo_cost
# Methods ($METHODS, default all four; METHODS= trains the BC alone): rest (the experiment's Grow and Improve
# steps), dpo (runs/dpo.gin at Improve rate $DPO_LR, default 2e-5, the demo's: its 2e-3 collapses DPO; on
# Multi30k 5e-4, chosen on seed 0 and reward hacking on seeds 1 and 2: README "Online RL", docs/results.md; patience 3, so that its
# slow rise runs the stage's steps), grpo
# and ppo (runs/grpo.gin, runs/ppo.gin, with the experiment's online budget: on the demo 60 iterations x 32
# sources x 4 samples, as many reward calls as Grow's 2,000 sources x 4 samples; rate $ONLINE_LR, default the
# .gin's AdamW rate).
# The experiment is $EXPERIMENT (default experiments/demo.gin). With $BC_DIR set, each seed starts from the BC
# run $BC_DIR/s<seed>/bc (e.g. the Multi30k study's) instead of training one. Arguments after the seeds
# (--gin.X=Y) go to every run. Runs land in $COST_DIR/s<seed>/<method> (default runs/demo_cost); a rerun skips
# finished stages, and one without --gin.run_rest.num_grow_steps / num_improve_steps extends a shorter ReST run. Multi30k (issue 15's second task), from the study's BC policies:
#   EXPERIMENT=experiments/multi30k_de_en.gin BC_DIR=runs/m30k_study COST_DIR=runs/m30k_cost \
#     ONLINE_LR=1e-3 DPO_LR=5e-4 scripts/cost_comparison.sh 0
set -euo pipefail
seeds=()
while [[ $# -gt 0 && "$1" != --* ]]; do seeds+=("$1"); shift; done
if [[ ${#seeds[@]} -eq 0 ]]; then
  echo "usage: $0 SEED [SEED ...] [--gin.X=Y ...]" >&2
  exit 2
fi
dir=${COST_DIR:-runs/demo_cost}
experiment=${EXPERIMENT:-experiments/demo.gin}
methods=" ${METHODS-rest dpo grpo ppo} "
for method in $methods; do
  case $method in rest|dpo|grpo|ppo) ;; *) echo "$0: unknown method '$method' in METHODS" >&2; exit 2 ;; esac
done
for seed in "${seeds[@]}"; do
  run() {  # method, subcommand, then gin files that go after the experiment's
    local method=$1 command=$2; shift 2
    python -m rest_jax.main "$command" --gin_file="$experiment" "$@" \
      --gin.MODEL_DIR="'$dir/s$seed/$method'" "${extra[@]}"
  }
  extra=(--gin.run_rest.seed="$seed" --gin.run_rest.best_of_n_ns="()" "$@")
  if [[ -n "${BC_DIR:-}" ]]; then
    bc_run=$BC_DIR/s$seed/bc
  else
    bc_run=$dir/s$seed/bc
    run bc rest --gin.run_rest.num_grow_steps=0
  fi
  extra+=(--gin.run_rest.bc_run="'$bc_run'")
  if [[ $methods == *" rest "* ]]; then run rest rest; fi
  if [[ $methods == *" dpo "* ]]; then
    run dpo rest --gin_file=runs/dpo.gin --gin.improve/learning_rate_schedule.base_learning_rate="${DPO_LR:-2e-5}" \
      --gin.improve_step.patience=3
  fi
  for algorithm in grpo ppo; do
    if [[ $methods != *" $algorithm "* ]]; then continue; fi
    extra=(--gin.online.seed="$seed" --gin.online.bc_run="'$bc_run'" "$@")
    if [[ -n "${ONLINE_LR:-}" ]]; then
      extra+=(--gin.online/learning_rate_schedule.base_learning_rate="$ONLINE_LR")
    fi
    run "$algorithm" online --gin_file=runs/$algorithm.gin
  done
done
