#!/usr/bin/env bash
# Prepare the GPU window on the CPU machine (docs/gpu-window.md): upstream's src/ into .gpu/upstream/src and the
# training images into .gpu/data. Then run `bash scripts/gpu_session.sh` on the device with carry [".gpu"].
#
#   scripts/prepare_gpu_window.sh [UPSTREAM]
#
# UPSTREAM: a bare git dir of eduardzamfir/MoCE-IR, a checkout of it, or its src/ folder (default: the local mirror).
# Upstream's code is never committed here: .gpu/ is git-ignored. pip fetches einops, which upstream's network needs.
# DATASETS (default ../shared/datasets) is packed by scripts/pack_gpu_data.py when .gpu/data is missing; delete
# .gpu/data to pack it again.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DATASETS=${DATASETS:-$ROOT/../shared/datasets}
MIRROR=/work/.mirror/eduardzamfir+MoCE-IR
SRC=${1:-$([ -d "$MIRROR/repo" ] && echo "$MIRROR/repo" || echo "$MIRROR")}
DEST=$ROOT/.gpu/upstream

export_upstream() {  # $1: where upstream is; fills $DEST/src and $DEST/REVISION
  local src=$1 git_dir=""
  if git --git-dir="$src" rev-parse -q --verify HEAD >/dev/null 2>&1; then git_dir=$src
  elif git --git-dir="$src/.git" rev-parse -q --verify HEAD >/dev/null 2>&1; then git_dir=$src/.git
  fi
  rm -rf "$DEST" && mkdir -p "$DEST"
  if [ -n "$git_dir" ]; then  # the committed tree, not whatever a checkout has lying around
    git --git-dir="$git_dir" archive HEAD src | tar -x -C "$DEST"
    git --git-dir="$git_dir" log -1 --format='%H %cs %s' > "$DEST/REVISION"
  elif [ -f "$src/src/net/moce_ir.py" ]; then cp -r "$src/src" "$DEST/src"; echo "copied from $src" > "$DEST/REVISION"
  elif [ -f "$src/net/moce_ir.py" ]; then cp -r "$src" "$DEST/src"; echo "copied from $src" > "$DEST/REVISION"
  else
    echo "error: $src is neither a git dir of eduardzamfir/MoCE-IR nor a folder holding src/net/moce_ir.py" >&2
    return 1
  fi
  find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
  [ -f "$DEST/src/net/moce_ir.py" ] || { echo "error: no src/net/moce_ir.py in $src" >&2; return 1; }
}

export_upstream "$SRC"
# Upstream's network imports einops, which moceir does not need: it travels beside upstream's code (pure Python).
"$PYTHON" -m pip install --quiet --no-deps --target "$DEST/pylib" einops
echo "upstream: $DEST/src ($(cat "$DEST/REVISION")), its dependencies in $DEST/pylib"
# The run tool's 64 MiB counts the whole working tree (tracked files and untracked ones git does not ignore) plus
# what carry names, so the pack gets what is left after the tree and upstream's code (1 MiB kept spare).
tree_bytes() {  # files deleted from the tree but still tracked are skipped (stat fails on them)
  (cd "$ROOT" && { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true; } \
    | awk '{s += $1} END {print s + 0}')
}
room_mib=$(( (64 * 1024 * 1024 - $(tree_bytes) - $(du -sb "$DEST" | cut -f1)) / 1024 / 1024 - 1 ))
if [ -d "$ROOT/.gpu/data" ] && [ "$(du -sb "$ROOT/.gpu/data" | cut -f1)" -gt $((room_mib * 1024 * 1024)) ]; then
  echo ".gpu/data is larger than the ${room_mib} MiB the working tree leaves: packing it again"
  rm -rf "$ROOT/.gpu/data"
fi
if [ ! -d "$ROOT/.gpu/data" ]; then
  "$PYTHON" "$ROOT/scripts/pack_gpu_data.py" --data_file_dir "$DATASETS" --out "$ROOT/.gpu/data" --limit_mib "$room_mib"
fi
total=$(( ($(tree_bytes) + $(du -sb "$ROOT/.gpu" | cut -f1)) / 1024 / 1024 ))
echo "the working tree and .gpu hold ${total} MiB (the run tool's limit: 64 MiB)"
[ "$total" -lt 64 ] || { echo "error: ${total} MiB to send; make room in the working tree" >&2; exit 1; }
