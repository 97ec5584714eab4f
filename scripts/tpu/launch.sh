#!/usr/bin/env bash
# Launch a rest_jax run on every worker of a TPU slice: the same command on each host (multi-host JAX).
#
# usage: scripts/tpu/launch.sh [--name N] [--project P] [--zone Z] [--run-name R] [--env K=V]...
#            [--no-distributed] [--worker all|N] [--dry-run] -- SUBCOMMAND [rest_jax flags...]
#
#   Runs `~/rest_jax_venv/bin/python -m rest_jax.main SUBCOMMAND ...` under nohup in ~/rest_jax on the
#   workers; output goes to ~/rest_jax_logs/R.log and the pid to ~/rest_jax_logs/R.pid (latest.log and
#   latest.pid point at the newest run).  Refuses to start a run name that is still running.
#   --run-name R        default run-YYYYmmdd-HHMMSS (the same on all workers).
#   --env K=V           extra environment for the run (repeatable), e.g. --env TF_CPP_MIN_LOG_LEVEL=2.
#   --no-distributed    do not set REST_JAX_DISTRIBUTED=1 (set by default: every worker calls
#                       jax.distributed.initialize(), which a pod slice needs).
#   Model dir, data and vocab should be gs:// paths that every worker can read (see docs/tpu.md).
# Example: scripts/tpu/launch.sh --name rest-v4 --zone us-central2-b --run-name bc -- \
#            train --gin_file=tasks/multi30k_de_en.gin --gin_file=models/t5_1_1_small.gin \
#            --model_dir=gs://my-bucket/rest/bc --gin.MULTI30K_DIR="'gs://my-bucket/data/multi30k'" \
#            --gin.get_task.vocabulary="'gs://my-bucket/vocab/spm.model'"

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME="run-$(date +%Y%m%d-%H%M%S)"
DISTRIBUTED=1
WORKER="all"
ENVS=()
COMMAND=()
while (($#)); do
  case "$1" in
    --run-name|--run-name=*) flag_value "$@"; RUN_NAME="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --env|--env=*)
      flag_value "$@"
      [[ "$FLAG_VALUE" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$FLAG_VALUE': expected NAME=VALUE"
      ENVS+=("$(printf '%q' "$FLAG_VALUE")")
      shift "$SHIFT_BY" ;;
    --no-distributed) DISTRIBUTED=0; shift ;;
    --worker|--worker=*) flag_value "$@"; WORKER="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --) shift; COMMAND=("$@"); break ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1'; the rest_jax command goes after '--' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
check_run_name "$RUN_NAME"
((${#COMMAND[@]})) || die "no command: add '-- SUBCOMMAND [flags]', e.g. -- train --model_dir=gs://b/run"
[[ "$WORKER" =~ ^(all|[0-9]+)$ ]] || die "--worker '$WORKER': all or a worker number"
if ((DISTRIBUTED)); then ENVS=("REST_JAX_DISTRIBUTED=1" ${ENVS[@]+"${ENVS[@]}"}); fi

ARGS=""
for arg in "${COMMAND[@]}"; do ARGS+=" $(printf '%q' "$arg")"; done
# shellcheck disable=SC2088  # "~" is expanded by the shell on the worker, not here
LOG="~/$REMOTE_LOGS/$RUN_NAME"

# shellcheck disable=SC2016  # $(...), $! and ~ are for the worker's shell
REMOTE="set -e; mkdir -p ~/$REMOTE_LOGS; cd ~/$REMOTE_REPO"'; if [ -f '"$LOG"'.pid ] && kill -0 "$(cat '"$LOG"'.pid)" 2>/dev/null; then echo "'"$RUN_NAME"' is already running on $(hostname)" >&2; exit 1; fi'
REMOTE+="; nohup env ${ENVS[*]+${ENVS[*]}} ~/$REMOTE_VENV/bin/python -m rest_jax.main$ARGS > $LOG.log 2>&1 < /dev/null &"
# shellcheck disable=SC2016
REMOTE+=' echo $! > '"$LOG"'.pid; ln -sfn '"$RUN_NAME"'.log ~/'"$REMOTE_LOGS"'/latest.log; ln -sfn '"$RUN_NAME"'.pid ~/'"$REMOTE_LOGS"'/latest.pid; echo "started '"$RUN_NAME"' on $(hostname), pid $(cat '"$LOG"'.pid), log '"$LOG"'.log"'

tpu_ssh "$WORKER" "$REMOTE"
info "follow it with: scripts/tpu/logs.sh --name $TPU_NAME --run-name $RUN_NAME"
