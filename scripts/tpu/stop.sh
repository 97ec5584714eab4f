#!/usr/bin/env bash
# Stop a rest_jax run on every worker of a TPU slice (frees the TPU for the next launch).
#
# usage: scripts/tpu/stop.sh [--name N] [--project P] [--zone Z] [--run-name R|latest] [--dry-run]
#
#   Sends SIGTERM to the pid recorded in ~/rest_jax_logs/R.pid on each worker (default: the latest
#   run), waits up to 30 s, then SIGKILL.  Only that process is touched.
# Example: scripts/tpu/stop.sh --name rest-v4 --zone us-central2-b --run-name bc

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME="latest"
while (($#)); do
  case "$1" in
    --run-name|--run-name=*) flag_value "$@"; RUN_NAME="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
check_run_name "$RUN_NAME"

# shellcheck disable=SC2088  # "~" is expanded by the shell on the worker, not here
PID_FILE="~/$REMOTE_LOGS/$RUN_NAME.pid"
# shellcheck disable=SC2016  # $pid and $(...) are for the worker's shell
REMOTE='if [ ! -f '"$PID_FILE"' ]; then echo "no '"$RUN_NAME"' run on $(hostname)"; exit 0; fi; pid=$(cat '"$PID_FILE"'); if kill "$pid" 2>/dev/null; then for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; kill -9 "$pid" 2>/dev/null || true; echo "stopped pid $pid on $(hostname)"; else echo "'"$RUN_NAME"' not running on $(hostname)"; fi'
tpu_ssh all "$REMOTE"
