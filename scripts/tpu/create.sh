#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for rest_jax.
#
# usage: scripts/tpu/create.sh [--name N] [--project P] [--zone Z] [--accelerator-type T]
#            [--runtime-version V] [--spot] [--queued [--reserved] [--valid-until-duration D] [--wait]]
#            [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]
#
#   --queued     ask through a queued resource (gcloud compute tpus queued-resources create), the way
#                to get large slices; the node gets the same name as the queued resource.
#   --wait       with --queued: poll until the slice is ACTIVE (fails on FAILED/SUSPENDED).
#   --spot       spot (preemptible) capacity.  --reserved: use a reservation (queued only).
#   Anything after "--" is passed to gcloud unchanged (e.g. --network=..., --subnetwork=...).
# Example: scripts/tpu/create.sh --name rest-v4 --zone us-central2-b --accelerator-type v4-32 --dry-run

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
WAIT=0
SPOT=0
RESERVED=0
VALID_UNTIL=""
EXTRA=()
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --wait) WAIT=1; shift ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --valid-until-duration|--valid-until-duration=*) flag_value "$@"; VALID_UNTIL="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --) shift; EXTRA=("$@"); break ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
((QUEUED)) || [[ $RESERVED == 0 && -z "$VALID_UNTIL" && $WAIT == 0 ]] \
  || die "--reserved, --valid-until-duration and --wait need --queued"

CAPACITY=()
if ((SPOT)); then CAPACITY+=(--spot); fi
if ((RESERVED)); then CAPACITY+=(--reserved); fi

if ((QUEUED)); then
  ARGS=(gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"}
        "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--runtime-version=$TPU_RUNTIME_VERSION" ${CAPACITY[@]+"${CAPACITY[@]}"})
  if [[ -n "$VALID_UNTIL" ]]; then ARGS+=("--valid-until-duration=$VALID_UNTIL"); fi
  run "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  if ((WAIT)); then
    DESCRIBE=(gcloud compute tpus queued-resources describe "$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"} "--format=value(state.state)")
    if [[ "$DRY_RUN" == 1 ]]; then
      info "would poll every 30 s until the state is ACTIVE:"
      run "${DESCRIBE[@]}"
    else
      while true; do
        STATE="$("${DESCRIBE[@]}")"
        info "queued resource $TPU_NAME: $STATE"
        case "$STATE" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) die "queued resource $TPU_NAME is $STATE" ;;
        esac
        sleep 30
      done
    fi
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"} \
    "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--version=$TPU_RUNTIME_VERSION" ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
fi
