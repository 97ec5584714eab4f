#!/usr/bin/env bash
# Install rest_jax on every worker of a TPU VM / pod slice (same source, same environment everywhere).
#
# usage: scripts/tpu/setup.sh [--name N] [--project P] [--zone Z] [--repo URL [--ref REF]]
#            [--python 3.11] [--jax-version X] [--extras test] [--dry-run]
#
#   default      copy this checkout as git sees it (tracked files with their uncommitted edits, and
#                new files .gitignore does not exclude), scp'd to ~/rest_jax on all workers.
#   --repo URL   instead, git clone URL (branch or tag --ref, default main) on every worker.
#   Then on every worker: uv (https://docs.astral.sh/uv) makes ~/rest_jax_venv with Python --python
#   (default 3.11; TPU images ship older ones), and installs `pip install -e ~/rest_jax` plus
#   jax[tpu] at the version pinned in setup.py (or --jax-version).
# Example: scripts/tpu/setup.sh --name rest-v4 --zone us-central2-b --dry-run

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL=""
REF="main"
PYTHON_VERSION="3.11"
JAX_VERSION=""
EXTRAS=""
while (($#)); do
  case "$1" in
    --repo|--repo=*) flag_value "$@"; REPO_URL="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --ref|--ref=*) flag_value "$@"; REF="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --python|--python=*) flag_value "$@"; PYTHON_VERSION="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --jax-version|--jax-version=*) flag_value "$@"; JAX_VERSION="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --extras|--extras=*) flag_value "$@"; EXTRAS="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    *)
      parse_common_flag "$@"
      ((SHIFT_BY)) || die "unknown flag '$1' (see --help)"
      shift "$SHIFT_BY" ;;
  esac
done
finish_common_flags
if [[ -z "$JAX_VERSION" ]]; then
  JAX_VERSION="$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' "$REPO_ROOT/setup.py" | head -n 1)"
  [[ -n "$JAX_VERSION" ]] || die "no jax==X pin in $REPO_ROOT/setup.py; pass --jax-version"
fi
[[ "$EXTRAS" =~ ^[a-z0-9_,-]*$ ]] || die "--extras '$EXTRAS': comma-separated extra names"
[[ "$PYTHON_VERSION" =~ ^[0-9.]+$ ]] || die "--python '$PYTHON_VERSION': a version such as 3.11"

if [[ -n "$REPO_URL" ]]; then
  FETCH="if [ -d ~/$REMOTE_REPO/.git ]; then git -C ~/$REMOTE_REPO fetch --depth 1 origin $(printf '%q' "$REF")"
  FETCH+=" && git -C ~/$REMOTE_REPO checkout --force FETCH_HEAD; else rm -rf ~/$REMOTE_REPO"
  FETCH+=" && git clone --depth 1 --branch $(printf '%q' "$REF") $(printf '%q' "$REPO_URL") ~/$REMOTE_REPO; fi"
else
  TARBALL="${TMPDIR:-/tmp}/rest_jax_src.tar.gz"
  if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    # The working tree as git sees it: tracked files (with uncommitted edits) and new files that
    # .gitignore does not exclude; no build outputs, virtual environments or checkpoints.
    FILE_LIST="${TMPDIR:-/tmp}/rest_jax_src.files"
    if [[ "$DRY_RUN" != 1 ]]; then
      : > "$FILE_LIST"
      while IFS= read -r -d '' file; do
        if [[ -e "$REPO_ROOT/$file" ]]; then printf '%s\n' "$file" >> "$FILE_LIST"; fi
      done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)
    fi
    run tar -czf "$TARBALL" -C "$REPO_ROOT" -T "$FILE_LIST"
  else
    run tar -czf "$TARBALL" --exclude=.git -C "$REPO_ROOT" .
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:rest_jax_src.tar.gz" ${SCOPE[@]+"${SCOPE[@]}"} --worker=all
  FETCH="rm -rf ~/$REMOTE_REPO.new && mkdir -p ~/$REMOTE_REPO.new"
  FETCH+=" && tar -xzf ~/rest_jax_src.tar.gz -C ~/$REMOTE_REPO.new"
  FETCH+=" && rm -rf ~/$REMOTE_REPO && mv ~/$REMOTE_REPO.new ~/$REMOTE_REPO"
fi

TARGET="."
if [[ -n "$EXTRAS" ]]; then TARGET=".[$EXTRAS]"; fi
# shellcheck disable=SC2088  # "~" is expanded by the shell on the worker, not here
UV="~/.local/bin/uv"  # where uv's installer puts it
INSTALL="(command -v $UV >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
INSTALL+=" && ([ -x ~/$REMOTE_VENV/bin/python ] || $UV venv --python $PYTHON_VERSION ~/$REMOTE_VENV)"
INSTALL+=" && cd ~/$REMOTE_REPO && $UV pip install --python ~/$REMOTE_VENV/bin/python -e $(printf '%q' "$TARGET")"
INSTALL+=" $(printf '%q' "jax[tpu]==$JAX_VERSION")"
INSTALL+=" && ~/$REMOTE_VENV/bin/python -c 'import rest_jax, jax; print(\"rest_jax installed, jax\", jax.__version__)'"

tpu_ssh all "set -e; $FETCH; $INSTALL"
