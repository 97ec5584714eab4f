# shellcheck shell=bash
# shellcheck disable=SC2034  # its variables are read by the scripts that source it
# Helpers shared by scripts/tpu/*.sh; sourced, never run on its own.
#
# Every setting has a flag and an environment variable (flags win):
#   --project          TPU_PROJECT           (default: gcloud's configured project)
#   --zone             TPU_ZONE              (default: gcloud's configured compute/zone)
#   --name             TPU_NAME              (default: rest-jax)
#   --accelerator-type TPU_ACCELERATOR_TYPE  (default: v4-8)
#   --runtime-version  TPU_RUNTIME_VERSION   (default: chosen from the accelerator type)
#   --dry-run          DRY_RUN=1             print the exact commands instead of running them
# Paths on the workers are relative to the login user's home directory.

set -euo pipefail

TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_NAME="${TPU_NAME:-rest-jax}"
TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_REPO="rest_jax"            # ~/rest_jax: the project's source on each worker
REMOTE_VENV="rest_jax_venv"       # ~/rest_jax_venv: its virtual environment
REMOTE_LOGS="rest_jax_logs"       # ~/rest_jax_logs/<run>.log and <run>.pid, plus latest.{log,pid}
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SCRIPT="$(basename "$0")"

die() {
  echo "${SCRIPT}: error: $*" >&2
  exit 2
}

info() {
  echo "${SCRIPT}: $*" >&2
}

# Prints the comment block at the top of the calling script (its usage).
usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
}

# Shell-quotes each argument only where needed, so the printed line can be pasted into a shell.
quote_cmd() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ $safe ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or with --dry-run prints it (stdout) and runs nothing.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_cmd "$@"
  else
    info "+ $(quote_cmd "$@")"
    "$@"
  fi
}

# Reads the value of "--flag=value" or "--flag value" into FLAG_VALUE; SHIFT_BY says how many
# arguments that used.
flag_value() {
  if [[ "$1" == *=* ]]; then
    FLAG_VALUE="${1#*=}"
    SHIFT_BY=1
  else
    [[ $# -ge 2 ]] || die "$1 needs a value"
    FLAG_VALUE="$2"
    SHIFT_BY=2
  fi
}

# Parses one of the common flags at "$1"; SHIFT_BY=0 when "$1" is not one of them.
parse_common_flag() {
  SHIFT_BY=0
  case "$1" in
    --project|--project=*) flag_value "$@"; TPU_PROJECT="$FLAG_VALUE" ;;
    --zone|--zone=*) flag_value "$@"; TPU_ZONE="$FLAG_VALUE" ;;
    --name|--name=*) flag_value "$@"; TPU_NAME="$FLAG_VALUE" ;;
    --accelerator-type|--accelerator-type=*) flag_value "$@"; TPU_ACCELERATOR_TYPE="$FLAG_VALUE" ;;
    --runtime-version|--runtime-version=*) flag_value "$@"; TPU_RUNTIME_VERSION="$FLAG_VALUE" ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h|--help) usage; exit 0 ;;
  esac
}

# Software image for an accelerator type (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# Call after parsing: checks names and fills SCOPE (the --project/--zone flags for gcloud).
finish_common_flags() {
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name '$TPU_NAME': use lower-case letters, digits and '-' (a GCE resource name)"
  TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-$(default_runtime_version "$TPU_ACCELERATOR_TYPE")}"
  SCOPE=()
  if [[ -n "$TPU_PROJECT" ]]; then SCOPE+=("--project=$TPU_PROJECT"); fi
  if [[ -n "$TPU_ZONE" ]]; then SCOPE+=("--zone=$TPU_ZONE"); fi
}

# Runs a shell command on TPU workers: tpu_ssh WORKER COMMAND (WORKER: all, 0, 1, ...).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${SCOPE[@]+"${SCOPE[@]}"} "--worker=$1" "--command=$2"
}

# Checks a run name (used in remote file names).
check_run_name() {
  [[ "$1" =~ ^[A-Za-z0-9._-]+$ ]] || die "run name '$1': use letters, digits, '.', '_' and '-'"
}
