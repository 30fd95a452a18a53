#!/bin/sh
# Builds fuzz/corpus/<target>/ from the fixtures (the torch.save differential corpus
# included: every container, protocol, CRC mode, stem length and dtype), the mapping tables
# and fuzz/seeds/.
# Safe to rerun: it only adds files (libFuzzer keeps what it found next to them).
set -eu
cd "$(dirname "$0")"
F=../fixtures
mkdir -p corpus/unpickle corpus/container corpus/safetensors corpus/mapping_table
for f in $F/*.pth $F/golden/*.pth $F/torch_corpus/*.pth $F/torch_corpus/stems/*.pth seeds/*.pth; do
    b=$(basename "$f" .pth)
    cp "$f" "corpus/container/$b.pth"
    # The data.pkl of every zip checkpoint; the raw stream of every legacy one.
    if unzip -Z1 "$f" >/dev/null 2>&1; then
        # (CRC-off archives record every CRC as 0: unzip complains but extracts.)
        unzip -p "$f" '*/data.pkl' > "corpus/unpickle/$b.pkl" 2>/dev/null || true
    else
        head -c 16384 "$f" > "corpus/unpickle/$b.legacy"
    fi
done
cp seeds/*.pkl corpus/unpickle/
cp $F/*.safetensors seeds/*.safetensors corpus/safetensors/
cp seeds/*.safetensors corpus/container/
cp ../mappings/*.toml corpus/mapping_table/
# The example tables of the format's documentation.
awk '/^```toml$/ {n++; f=sprintf("corpus/mapping_table/readme_%d.toml", n); next} /^```$/ {f=""} f {print > f}' ../mappings/README.md
echo "corpus: $(ls corpus/unpickle | wc -l) pickles, $(ls corpus/container | wc -l) checkpoints, $(ls corpus/safetensors | wc -l) safetensors, $(ls corpus/mapping_table | wc -l) tables"
