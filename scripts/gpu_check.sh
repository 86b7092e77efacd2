#!/usr/bin/env bash
# The GPU checks of issue 3 in one command, for a machine with CUDA and a python3 that holds torch, typer,
# tqdm, pyyaml, safetensors and pytest (the device tool's image has them all). Run from the repository root:
#
#     OUT=folder CORPUS=train.txt VAL=val.txt bash scripts/gpu_check.sh [tests] [bench] [bf16]
#
# with no stage named, all three in that order. What each writes under $OUT (default runs/gpu):
#   env.txt          torch, CUDA and the GPU
#   tests.txt        tests/test_cuda.py on the GPU (the custom cells against cuDNN, scores, runs, bf16)
#   standard.md      scripts/bench_standard.py --device cuda (the standard set, shorter rounds)
#   bench_log.txt    that script's own output
#   bf16.txt         the character config trained for $SECONDS_PER_RUN s (default 60) in fp32 and in bf16
#                    autocast, each run's JSON line, then `charlm eval` of each on $VAL (JSON)
#   bf16_log.txt     the two runs' progress and any error
# CORPUS and VAL (bf16 only): a training text and a validation text, e.g. tinyshakespeare's train.txt and
# val.txt copied into a folder that git ignores and that the call carries. The runs themselves go to a
# temporary folder; only the figures come back. Each stage's output is written as it goes, so a stage cut
# short by a time limit still leaves what it printed.
set -uo pipefail

out=${OUT:-runs/gpu}
seconds=${SECONDS_PER_RUN:-60}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench bf16)
for stage in "${stages[@]}"; do
    case $stage in
        tests|bench|bf16) ;;
        *) echo "unknown stage '$stage': choose among tests, bench, bf16" >&2; exit 2 ;;
    esac
done

{
    date -u
    "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
    nproc
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
for stage in "${stages[@]}"; do
    case $stage in
        tests)
            "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" || status=1
            ;;
        bench)
            "$py" scripts/bench_standard.py --device cuda --seconds 3 --rounds 3 --out "$out/standard.md" \
                > "$out/bench_log.txt" 2>&1 || status=1
            tail -5 "$out/bench_log.txt"
            ;;
        bf16)
            if [ -z "${CORPUS:-}" ] || [ -z "${VAL:-}" ]; then
                echo "bf16: set CORPUS and VAL to a training and a validation text" | tee "$out/bf16.txt"
                status=1
                continue
            fi
            runs=$(mktemp -d)
            : > "$out/bf16.txt"
            for precision in fp32 bf16; do
                "$py" -m charlm train --config configs/char_shakespeare.yaml --corpus "$CORPUS" --val "$VAL" \
                    --device cuda --max-time "$seconds" --set "train.precision=$precision" --out "$runs/$precision" \
                    --json 2>> "$out/bf16_log.txt" | sed "s/^/train $precision: /" | tee -a "$out/bf16.txt" || status=1
                "$py" -m charlm eval "$runs/$precision" --file "$VAL" --device cuda --json 2>> "$out/bf16_log.txt" \
                    | sed "s/^/eval $precision: /" | tee -a "$out/bf16.txt" || status=1
            done
            rm -rf "$runs"
            ;;
    esac
done
exit $status
