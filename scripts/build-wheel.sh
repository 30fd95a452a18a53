#!/usr/bin/env bash
# Builds the pip wheel: the `ckptmap` binary (maturin, bindings = "bin") plus the thin
# Python module in python/ckptmap, into target/wheels/.
#
#   scripts/build-wheel.sh          release build (what users install; ~8 min on 2 cores
#                                   the first time, as `cargo build --release`)
#   scripts/build-wheel.sh --dev    dev-profile build: reuses the `cargo test` / `cargo run`
#                                   build of the dependencies (seconds after it); for tests
#
# maturin comes from PyPI into a private venv under target/wheel-tools (made once), so
# nothing is installed into your Python. Needs python3 with venv and pip, and the network
# the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
case "${1:-}" in
    --dev) profile=() ;;
    "") ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "usage: scripts/build-wheel.sh [--dev]" >&2; exit 2 ;;
esac
tools=target/wheel-tools
if [ ! -x "$tools/bin/maturin" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "maturin>=1.5,<2"
fi
rm -f target/wheels/ckptmap-*.whl
"$tools/bin/maturin" build --locked "${profile[@]}" --out target/wheels
ls target/wheels/ckptmap-*.whl
