#!/usr/bin/env bash
# The pip path end to end: builds the wheel (scripts/build-wheel.sh --dev, reusing the test
# build), installs it into a fresh venv and runs README's main command through it, as the
# `ckptmap` on the venv's PATH, as `python -m ckptmap`, and through ckptmap.convert().
# Prints "skipped: ..." and exits 0 where python3 with venv and pip (or PyPI, for maturin)
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "wheel test skipped: $*"; exit 0; }
command -v python3 >/dev/null || skip "no python3 on PATH"
python3 -c 'import venv, ensurepip' 2>/dev/null || skip "python3 has no venv/ensurepip module (apt install python3-venv)"
if [ ! -x target/wheel-tools/bin/maturin ]; then
    python3 -m venv target/wheel-tools || skip "python3 -m venv failed"
    target/wheel-tools/bin/pip install --quiet "maturin>=1.5,<2" || { rm -rf target/wheel-tools; skip "cannot pip install maturin (no PyPI?)"; }
fi
scripts/build-wheel.sh --dev
wheel=$(ls target/wheels/ckptmap-*.whl)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv/env"
"$venv/env/bin/pip" install --quiet --no-index "$wheel"
# README's main command, as written but for `cargo run --locked --` -> the installed binary.
main=$(grep -m1 '^cargo run --locked -- ' README.md | sed 's/ #.*//; s/^cargo run --locked -- //')
[ -n "$main" ] || { echo "README.md has no 'cargo run --locked -- ' line" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$venv" "$out"' EXIT
mkdir "$out/fixtures"   # a copy: the Python part tries to convert a file onto itself
cp fixtures/mae_tiny.pth "$out/fixtures/"
(
    cd "$out"
    PATH="$venv/env/bin:$PATH"
    [ "$(command -v ckptmap)" = "$venv/env/bin/ckptmap" ] || { echo "ckptmap is not on the venv's PATH" >&2; exit 1; }
    # shellcheck disable=SC2086
    ckptmap $main | tee log.txt
    grep -q PASS log.txt
    python -m ckptmap --version | grep -q '^ckptmap '
    python - <<'PY'
import ckptmap
report = ckptmap.convert("fixtures/mae_tiny.pth", "target/py.pth", num_heads=2)
assert report["mapping"] == "builtin:mae", report["mapping"]
assert report["output"]["tensors"] == 52, report["output"]
try:
    ckptmap.convert("fixtures/mae_tiny.pth", "fixtures/mae_tiny.pth", num_heads=2)
except ckptmap.CkptmapError as e:
    assert e.code == 2 and "input checkpoint itself" in e.message, e
else:
    raise AssertionError("converting a file onto itself did not fail")
print("python module: ok")
PY
)
echo "wheel test passed: $(basename "$wheel")"
