#!/usr/bin/env bash
# Copy the results of a rest_jax run to Cloud Storage (and optionally from there to this machine).
#
# usage: scripts/tpu/copy_results.sh [--name N] [--project P] [--zone Z] --dest gs://BUCKET/PATH
#            [--run-name R|latest] [--model-dir DIR] [--download LOCAL_DIR] [--gsutil] [--dry-run]
#
#   Every worker copies its log ~/rest_jax_logs/R.log to DEST/logs/<worker hostname>.log.
#   --model-dir DIR     a model directory on the workers' local disk (when MODEL_DIR was not gs://):
#                       worker 0 copies it to DEST/<basename DIR>/ (checkpoints, config.gin, events).
#   --download LOCAL    afterwards copy DEST to LOCAL on this machine (for notebooks, TensorBoard).
#   --gsutil            use `gsutil -m cp -r` instead of `gcloud storage cp -r`.
# Example: scripts/tpu/copy_results.sh --name rest-v4 --zone us-central2-b --run-name bc \
#            --dest gs://my-bucket/rest/bc --download ./runs/bc

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME="latest"
DEST=""
MODEL_DIR=""
DOWNLOAD=""
USE_GSUTIL=0
while (($#)); do
  case "$1" in
    --run-name|--run-name=*) flag_value "$@"; RUN_NAME="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --dest|--dest=*) flag_value "$@"; DEST="${FLAG_VALUE%/}"; shift "$SHIFT_BY" ;;
    --model-dir|--model-dir=*) flag_value "$@"; MODEL_DIR="${FLAG_VALUE%/}"; shift "$SHIFT_BY" ;;
    --download|--download=*) flag_value "$@"; DOWNLOAD="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --gsutil) USE_GSUTIL=1; shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
check_run_name "$RUN_NAME"
[[ "$DEST" == gs://?* ]] || die "--dest must be a gs:// path (got '${DEST}')"

COPY=(gcloud storage cp -r)
if ((USE_GSUTIL)); then COPY=(gsutil -m cp -r); fi
QDEST="$(printf '%q' "$DEST")"

# -L: latest.log is a symlink; copy the file it points to.
# shellcheck disable=SC2016  # $(hostname) is for the worker's shell
tpu_ssh all "cp -L ~/$REMOTE_LOGS/$RUN_NAME.log /tmp/rest_jax_$RUN_NAME.log && ${COPY[*]} /tmp/rest_jax_$RUN_NAME.log $QDEST/logs/"'$(hostname).log'
if [[ -n "$MODEL_DIR" ]]; then
  tpu_ssh 0 "${COPY[*]} $(printf '%q' "$MODEL_DIR") $QDEST/"
fi
if [[ -n "$DOWNLOAD" ]]; then
  if [[ "$DRY_RUN" != 1 ]]; then mkdir -p "$DOWNLOAD"; fi
  run "${COPY[@]}" "$DEST" "$DOWNLOAD"
fi
