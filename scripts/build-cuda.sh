#!/usr/bin/env bash
# build-cuda.sh - build `ckptmap --features cuda` on a machine WITHOUT a CUDA
# toolkit (and without a GPU), from pinned PyPI wheels of the CUDA 13.0 line.
#
# Usage:
#   scripts/build-cuda.sh [--print-env] [-h|--help] [-- EXTRA CARGO ARGS...]
#
#   (no args)     set up the private toolchain (first run only), then
#                 `cargo build --release --locked --features cuda` into a
#                 separate target dir, strip the binary and copy it to
#                 $CKPTMAP_CUDA_TARGET_DIR/ckptmap-cuda (default target/cuda/ckptmap-cuda).
#   --print-env   set up the toolchain, then print the `export` lines the build
#                 uses (eval them to run e.g. `cargo test --features cuda` yourself).
#   -- ARGS       extra arguments appended to the cargo build command line.
#
# If you already have a CUDA toolkit (nvcc on PATH, libs in /usr/local/cuda),
# you do not need this script: `cargo build --release --features cuda` is enough.
#
# What it does, all under target/ (nothing system-wide, nothing on PATH later):
#   1. creates a Python venv ($CKPTMAP_CUDA_VENV) and pip-installs exactly
#      cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2
#      (nvcc 13.0.88; a newer nvcc emits PTX that a 580 / CUDA 13.0 driver
#      cannot load, and 13.5 breaks cudarc's build). Re-runs reuse the venv.
#   2. makes a private lib folder ($CKPTMAP_CUDA_TOOLCHAIN/lib) with the
#      unversioned link names the wheels lack (libcudart.so, libcublas.so,
#      libcublasLt.so, libcurand.so, libnvrtc.so) and a LINK-TIME-ONLY stub
#      libcuda.so (soname libcuda.so.1) with an empty function for every cu*
#      symbol cudarc's driver bindings declare. The stub is only ever on the
#      link search path; the binary loads the real driver's libcuda.so.1 at run
#      time. Never ship or install the stub.
#   3. exports CUDA_HOME/CUDA_PATH (the wheels' nvidia/cu13 folder),
#      CUDA_COMPUTE_CAP (default 90, i.e. H100/H200), CUDARC_CUDA_VERSION=13000,
#      and builds with CARGO_TARGET_DIR=target/cuda, so the normal CPU build in
#      target/ is never invalidated. The default build and CI are untouched.
#
# Environment overrides:
#   CKPTMAP_CUDA_TOOLCHAIN   toolchain folder   (default: <repo>/target/cuda-toolchain)
#   CKPTMAP_CUDA_VENV        venv folder        (default: $CKPTMAP_CUDA_TOOLCHAIN/venv)
#   CKPTMAP_CUDA_TARGET_DIR  cargo target dir   (default: <repo>/target/cuda)
#   CUDA_COMPUTE_CAP         e.g. 80 for A100   (default: 90)
#   PYTHON                   interpreter used to create the venv (default: python3)
#
# Run-time needs of the result: an NVIDIA driver providing libcuda.so.1
# (>= 580, CUDA 13.0) plus libcudart.so.13, libcublas.so.13, libcublasLt.so.13
# and libcurand.so.10 (e.g. `pip install cuda-toolkit[cudart,cublas,curand]==13.0.2`
# and point LD_LIBRARY_PATH at its nvidia/cu13/lib). The script prints the
# exact NEEDED list at the end.
#
# A clean build takes several minutes (the CUDA kernels of candle-kernels are
# compiled by nvcc); the wheels need about 3 GB of disk. Be kind to a shared
# machine: `nice -n 19 scripts/build-cuda.sh`.
set -euo pipefail

CUDA_TOOLKIT_PIN='cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2'
EXPECTED_NVCC_RELEASE='13.0'
CUDARC_VERSION_CODE='13000'
LINK_LIBS=(cudart cublas cublasLt curand nvrtc)

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
log() { printf '[build-cuda] %s\n' "$*" >&2; }
die() { printf '[build-cuda] error: %s\n' "$*" >&2; exit 1; }

PRINT_ENV=0
EXTRA_CARGO_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --print-env) PRINT_ENV=1; shift ;;
        --) shift; EXTRA_CARGO_ARGS=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAIN="${CKPTMAP_CUDA_TOOLCHAIN:-$REPO_ROOT/target/cuda-toolchain}"
VENV="${CKPTMAP_CUDA_VENV:-$TOOLCHAIN/venv}"
TARGET_DIR="${CKPTMAP_CUDA_TARGET_DIR:-$REPO_ROOT/target/cuda}"
LIBDIR="$TOOLCHAIN/lib"
PYTHON="${PYTHON:-python3}"

for tool in "$PYTHON" cargo gcc readelf strip; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done

start_s=$SECONDS
mkdir -p "$TOOLCHAIN" "$LIBDIR"

# --- 1. private venv with the pinned CUDA wheels ------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIN_MARKER="$VENV/.ckptmap-cuda-pin"
if [ "$(cat "$PIN_MARKER" 2>/dev/null || true)" != "$CUDA_TOOLKIT_PIN" ]; then
    log "pip install $CUDA_TOOLKIT_PIN (about 3 GB; first run only)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
        "$CUDA_TOOLKIT_PIN"
    printf '%s' "$CUDA_TOOLKIT_PIN" > "$PIN_MARKER"
else
    log "reusing venv $VENV ($CUDA_TOOLKIT_PIN)"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA_ROOT_DIR="$SITE/nvidia/cu13"
NVCC_BIN="$CUDA_ROOT_DIR/bin/nvcc"
[ -x "$NVCC_BIN" ] || die "nvcc not found at $NVCC_BIN (delete $PIN_MARKER to reinstall)"
nvcc_release="$("$NVCC_BIN" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[ "$nvcc_release" = "$EXPECTED_NVCC_RELEASE" ] \
    || die "nvcc reports release '$nvcc_release', expected $EXPECTED_NVCC_RELEASE"

# --- 2. private link folder: unversioned names + libcuda stub -----------------
CUDA_LIB_SRC="$CUDA_ROOT_DIR/lib"
[ -d "$CUDA_LIB_SRC" ] || die "no lib folder in $CUDA_ROOT_DIR"
for name in "${LINK_LIBS[@]}"; do
    # the wheel ships libNAME.so.MAJOR (maybe also longer versions); link the
    # shortest versioned name, under both the unversioned and its own name
    versioned="$(cd "$CUDA_LIB_SRC" && ls -1 "lib$name.so."* 2>/dev/null \
                 | awk '{ print length($0) "\t" $0 }' | sort -n | head -n1 | cut -f2)"
    [ -n "$versioned" ] || die "lib$name.so.* not found in $CUDA_LIB_SRC"
    ln -sfn "$CUDA_LIB_SRC/$versioned" "$LIBDIR/lib$name.so"
    ln -sfn "$CUDA_LIB_SRC/$versioned" "$LIBDIR/$versioned"
done

# cudarc's driver bindings (dynamic-linking) declare the cu* symbols that the
# link needs from libcuda.so; find the cudarc that Cargo.lock pins.
CUDARC_DIR="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --locked \
    --features cuda --manifest-path "$REPO_ROOT/Cargo.toml" \
    | "$VENV/bin/python" -c '
import json, os, sys
meta = json.load(sys.stdin)
dirs = [os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "cudarc"]
if len(dirs) != 1:
    sys.exit("expected exactly one cudarc package, found %d" % len(dirs))
print(dirs[0])')"
DRIVER_BINDINGS="$CUDARC_DIR/src/driver/sys/mod.rs"
[ -f "$DRIVER_BINDINGS" ] || die "cudarc driver bindings not found at $DRIVER_BINDINGS"

STUB_C="$TOOLCHAIN/libcuda-stub.c"
STUB_SO="$LIBDIR/libcuda.so"
stub_src="$(
    echo "/* LINK-TIME-ONLY stub generated by scripts/build-cuda.sh from"
    echo "   $DRIVER_BINDINGS. Never load, ship or install this. */"
    grep -oE '^[[:space:]]*fn cu[A-Za-z0-9_]+\(' "$DRIVER_BINDINGS" \
        | sed -E 's/^[[:space:]]*fn ([A-Za-z0-9_]+)\(/\1/' | sort -u \
        | sed 's/.*/void &(void) {}/'
)"
n_syms="$(printf '%s\n' "$stub_src" | grep -c '^void ' || true)"
[ "$n_syms" -gt 100 ] || die "found only $n_syms cu* symbols in $DRIVER_BINDINGS"
if [ ! -f "$STUB_SO" ] || [ "$(cat "$STUB_C" 2>/dev/null || true)" != "$stub_src" ]; then
    log "building link-time libcuda stub ($n_syms symbols)"
    printf '%s\n' "$stub_src" > "$STUB_C"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB_SO" "$STUB_C"
fi

# --- 3. environment -----------------------------------------------------------
export CUDA_HOME="$CUDA_ROOT_DIR"
export CUDA_PATH="$CUDA_ROOT_DIR"
export NVCC="$NVCC_BIN"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="$CUDARC_VERSION_CODE"
export PATH="$CUDA_ROOT_DIR/bin:$PATH"
# -l search path for the linker driver, and ld's lookup of the libraries'
# own DT_NEEDED entries (libcublas -> libcublasLt); no rpath is recorded.
export LIBRARY_PATH="$LIBDIR${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="$TARGET_DIR"

if [ "$PRINT_ENV" = 1 ]; then
    for v in CUDA_HOME CUDA_PATH NVCC CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION PATH \
             LIBRARY_PATH LD_LIBRARY_PATH CARGO_TARGET_DIR; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    exit 0
fi

log "CUDA_HOME=$CUDA_HOME"
log "nvcc $nvcc_release, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
log "cargo target dir: $CARGO_TARGET_DIR"

# --- 4. build, strip, report --------------------------------------------------
build_start_s=$SECONDS
(cd "$REPO_ROOT" && cargo build --release --locked --features cuda \
    ${EXTRA_CARGO_ARGS[@]+"${EXTRA_CARGO_ARGS[@]}"})
log "cargo build took $((SECONDS - build_start_s)) s"

OUT_BIN="$TARGET_DIR/ckptmap-cuda"
cp -f "$TARGET_DIR/release/ckptmap" "$OUT_BIN.tmp"
strip "$OUT_BIN.tmp"
mv -f "$OUT_BIN.tmp" "$OUT_BIN"

if readelf -d "$OUT_BIN" | grep -qE 'R(UN)?PATH'; then
    die "$OUT_BIN records an rpath/runpath; refusing (it must not point at the toolchain)"
fi
size_bytes="$(stat -c %s "$OUT_BIN")"
echo "built: $OUT_BIN"
echo "size:  $size_bytes bytes ($(du -h "$OUT_BIN" | cut -f1))"
echo "NEEDED:"
readelf -d "$OUT_BIN" | grep NEEDED | sed -E 's/.*\[(.*)\]/  \1/'
echo "total time: $((SECONDS - start_s)) s"
