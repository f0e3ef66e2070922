#!/usr/bin/env bash
# A virtualenv with Burrow installed editable with the `dev` extra, at either end of the
# runtime dependency ranges in pyproject.toml: a range there is a promise, and CI proves both.
#
#   venv.sh DIR lowest    each direct runtime dependency at the lowest version its range
#                         admits (uv's --resolution lowest-direct); dev tools stay newest
#   venv.sh DIR newest    everything at the newest versions the ranges admit
#
# DIR is replaced. uv is taken from PATH, or installed once into a bootstrap venv (under
# $XDG_CACHE_HOME or ~/.cache, or BURROW_UV_VENV). PYTHON picks the interpreter (python3).
set -euo pipefail

die() { echo "venv.sh: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: venv.sh DIR lowest|newest"
dir=$1
mode=$2
case "$mode" in lowest | newest) ;; *) die "the second argument is lowest or newest, not '$mode'" ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}

uv=$(command -v uv || true)
if [ -z "$uv" ]; then
    boot=${BURROW_UV_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/burrow/uv-venv}
    if [ ! -x "$boot/bin/uv" ]; then
        "$python" -m venv "$boot"
        "$boot/bin/python" -m pip install -q uv
    fi
    uv=$boot/bin/uv
fi

# --seed: pip too, for whoever installs more into this venv later (make's deploy tools).
"$uv" venv -q --clear --seed --python "$python" "$dir"
target=(--python "$dir/bin/python")

if [ "$mode" = newest ]; then
    "$uv" pip install -q "${target[@]}" --upgrade -e "$root[dev]"
    exit 0
fi

# The lowest ends: resolve the runtime dependencies alone with lowest-direct, keep the pins of
# the direct ones, and install the package and its dev extra under those pins (the dev tools
# and every transitive dependency then resolve to their newest that fit).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$uv" pip compile -q "${target[@]}" --resolution lowest-direct --no-header --no-annotate \
    "$root/pyproject.toml" -o "$work/resolved.txt"
"$dir/bin/python" - "$root/pyproject.toml" "$work/resolved.txt" >"$work/lowest.txt" <<'EOF'
import re
import sys
import tomllib

def name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()

with open(sys.argv[1], "rb") as file:
    direct = {name(dep) for dep in tomllib.load(file)["project"]["dependencies"]}
for line in open(sys.argv[2]):
    if line.strip() and not line.startswith("#") and name(line) in direct:
        print(line.strip())
EOF
"$uv" pip install -q "${target[@]}" --constraint "$work/lowest.txt" -e "$root[dev]"
echo "venv.sh: $dir holds the lowest runtime versions:" $(tr '\n' ' ' <"$work/lowest.txt")
