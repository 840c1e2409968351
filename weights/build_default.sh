#!/usr/bin/env bash
# Rebuild the embedded default, weights/deris-tiny/, from scratch: DeRIS-tiny trained on RefShapes,
# then its Venice-H1 gate trained on features extracted from separate RefShapes splits, with the
# same commands a user runs for the official weights. Usage: bash weights/build_default.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/deris-tiny}
DEVICE=${DEVICE:-auto}

deris-rerank train-deris --preset deris-tiny --out "$RUN" --steps 4000 --batch-size 16 \
    --train-images 200000 --seed 0 --device "$DEVICE"

extract() {  # split, images, seed
    deris-rerank extract --data refshapes --split "$1" --refshapes-images "$2" --refshapes-seed "$3" \
        --refshapes-size 192 --deris "$RUN/model" --out "$RUN/cache" --batch-size 16 --device "$DEVICE"
}
extract gate-train 6000 11
extract gate-tune 1000 12
extract test 1000 13

deris-rerank train-gate --train "$RUN/cache/gate-train" --tune "$RUN/cache/gate-tune" --out "$RUN/model/gate" \
    --hidden-dim 128 --n-layers 2 --n-heads 4 --epochs 30 --batch-size 256 --seed 42 --device "$DEVICE"
deris-rerank evaluate --cache "$RUN/cache/test" --gate "$RUN/model/gate.safetensors" --out "$RUN/report"

mkdir -p weights/deris-tiny
cp "$RUN/model/"{model.safetensors,config.json,tokenizer.model,gate.safetensors,gate.json} weights/deris-tiny/
