#!/usr/bin/env bash
# Delete a TPU VM / pod slice (and its queued resource) when the run is over.
#
# usage: scripts/tpu/delete.sh [--name N] [--project P] [--zone Z] [--queued] [--yes] [--dry-run]
#
#   --queued   the slice came from `create.sh --queued`: delete the queued resource with --force,
#              which also deletes its node.
#   --yes      do not ask for confirmation (gcloud --quiet).
#   Copy results first (scripts/tpu/copy_results.sh): the workers' disks go with the slice.
# Example: scripts/tpu/delete.sh --name rest-v4 --zone us-central2-b --yes

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QUIET=()
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --yes) QUIET=(--quiet); shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"} --force ${QUIET[@]+"${QUIET[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"} ${QUIET[@]+"${QUIET[@]}"}
fi
