#!/usr/bin/env bash
# Conversion benchmark (issue 6): wall time against `cp` (+ `sync`) of the same file, and
# peak RSS from /usr/bin/time, on MAE-layout ViT-B (343 MB) and ViT-L (1.2 GB) checkpoints
# that our own writer generates (random weights, official key set). Nothing is committed.
#
#   bash benches/convert.sh [RUNS]          (default 3 runs per case; prints medians)
#
# Needs: a Rust toolchain, /usr/bin/time (Debian package `time`), ~5 GB free in $BENCH_DIR
# (default: a temporary folder under target/).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --release --quiet --bin ckptmap --example synth_checkpoint
bin=target/release/ckptmap
synth=target/release/examples/synth_checkpoint
dir=${BENCH_DIR:-$(mktemp -d -p target bench.XXXXXX)}
trap 'rm -rf "$dir"' EXIT
command -v /usr/bin/time >/dev/null || { echo "install /usr/bin/time (apt-get install time)"; exit 2; }

# median of the numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# run CMD... RUNS times; print "median_wall_s max_rss_mib"
measure() {
  local walls=() rss=0
  for _ in $(seq "$runs"); do
    rm -f "$dir"/out.*
    sync
    local t0 t1 r
    t0=$(date +%s.%N)
    /usr/bin/time -o "$dir/time.txt" -f "%M" "$@" >/dev/null 2>&1
    r=$(tail -1 "$dir/time.txt")
    t1=$(date +%s.%N)
    walls+=("$(echo "$t1 - $t0" | bc -l)")
    [ "$r" -gt "$rss" ] && rss=$r
  done
  printf '%s %s\n' "$(printf '%s\n' "${walls[@]}" | median)" "$((rss / 1024))"
}

cp_sync() { cp "$1" "$2" && sync "$2"; }
export -f cp_sync

printf '%-6s %-28s %10s %8s %10s\n' model case "median s" "x cp+sync" "peak MiB"
for size in base large; do
  src="$dir/mae_$size.pth"
  "$synth" "$size" "$src"
  cat "$src" >/dev/null   # warm page cache
  read -r cps _ < <(measure bash -c "cp_sync '$src' '$dir/out.cp'")
  read -r cpo _ < <(measure cp "$src" "$dir/out.cp")
  row() { printf '%-6s %-28s %10.3f %8.2f %10s\n' "$size" "$1" "$2" "$(echo "$2 / $cps" | bc -l)" "$3"; }
  row "cp + sync" "$cps" "-"
  row "cp" "$cpo" "-"
  read -r t m < <(measure "$bin" convert "$src" "$dir/out.pth"); row "convert (rename only)" "$t" "$m"
  read -r t m < <(measure "$bin" convert "$src" "$dir/out.pth" --img-size 512); row "convert --img-size 512" "$t" "$m"
  read -r t m < <(measure "$bin" convert "$src" "$dir/out.pth" --dtype f16); row "convert --dtype f16" "$t" "$m"
  read -r t m < <(measure "$bin" convert "$src" "$dir/out.safetensors"); row "convert -> .safetensors" "$t" "$m"
  read -r t m < <(measure "$bin" inspect "$src"); row "inspect" "$t" "$m"
  rm -f "$src"
done
