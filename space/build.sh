#!/usr/bin/env bash
# A Hugging Face Space folder made from this repository's last commit: a new git repository with
# one commit, in which weights and images are Git LFS objects (space/gitattributes). This
# repository's history is left as it is. Needs git-lfs.
#
#   space/build.sh /tmp/hat-space
#   git -C /tmp/hat-space push --force https://huggingface.co/spaces/USER/NAME main
set -euo pipefail
if ! git lfs version >/dev/null 2>&1; then
    echo "space/build.sh: git-lfs is needed (apt install git-lfs, or brew install git-lfs)" >&2
    exit 1
fi
out=${1:?usage: space/build.sh NEW_FOLDER}
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
if [ -e "$out" ]; then
    echo "space/build.sh: $out exists: name a new folder" >&2
    exit 1
fi
mkdir -p "$out"
git -C "$root" archive --format=tar HEAD | tar -x -C "$out"
cp "$root/space/gitattributes" "$out/.gitattributes"
cd "$out"
git init -q -b main
git lfs install --local >/dev/null
git add -A
git commit -q -m "HAT demo Space, from commit $(git -C "$root" rev-parse --short HEAD)"
echo "Space repository at $out; files stored in Git LFS:"
git lfs ls-files --name-only
