#!/usr/bin/env bash
# Follow the log of a rest_jax run on a TPU slice (from scripts/tpu/launch.sh).
#
# usage: scripts/tpu/logs.sh [--name N] [--project P] [--zone Z] [--run-name R|latest]
#            [--worker 0|all|N] [--lines 100] [--no-follow] [--dry-run]
#
#   Shows ~/rest_jax_logs/R.log (default: the latest run) of worker 0, where JAX process 0 runs and
#   the metrics and progress lines appear; --worker all shows every worker's log (gcloud prefixes
#   nothing, so lines of different hosts interleave).  --no-follow prints the tail and returns.
# Example: scripts/tpu/logs.sh --name rest-v4 --zone us-central2-b --run-name bc

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME="latest"
WORKER="0"
LINES=100
FOLLOW=1
while (($#)); do
  case "$1" in
    --run-name|--run-name=*) flag_value "$@"; RUN_NAME="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --worker|--worker=*) flag_value "$@"; WORKER="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --lines|--lines=*) flag_value "$@"; LINES="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --no-follow) FOLLOW=0; shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
check_run_name "$RUN_NAME"
[[ "$WORKER" =~ ^(all|[0-9]+)$ ]] || die "--worker '$WORKER': all or a worker number"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number"

TAIL="tail -n $LINES"
if ((FOLLOW)); then TAIL+=" -F"; fi
tpu_ssh "$WORKER" "$TAIL ~/$REMOTE_LOGS/$RUN_NAME.log"
