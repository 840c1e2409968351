#!/usr/bin/env bash
# Rebuild the embedded default, deris_rerank/embedded/deris-tiny/, from scratch: DeRIS-tiny trained on RefShapes,
# then its re-ranker (the calibrated one, which reads the expression) trained on features extracted
# from separate RefShapes splits, with the same commands a user runs for the official weights, and
# the bundled demo example.
# Usage: bash weights/build_default.sh [RUN_DIR]   (about 2 h 30 min on 2 CPU cores; DEVICE=cuda to use a GPU)
# STEPS and BATCH_SIZE (defaults 6000 and 16: the shipped default's) set the DeRIS training length,
# e.g. STEPS=60000 BATCH_SIZE=64 DEVICE=cuda for a longer run on a GPU. An interrupted run resumes
# from RUN_DIR/checkpoint.pt when the script is rerun with the same settings.
set -euo pipefail
RUN=${1:-runs/deris-tiny}
DEVICE=${DEVICE:-auto}
STEPS=${STEPS:-6000}
BATCH_SIZE=${BATCH_SIZE:-16}

deris-rerank train-deris --preset deris-tiny --out "$RUN" --steps "$STEPS" --batch-size "$BATCH_SIZE" \
    --train-images 200000 --seed 0 --device "$DEVICE"

extract() {  # split, images, seed, cache folder
    deris-rerank extract --data refshapes --split "$1" --refshapes-images "$2" --refshapes-seed "$3" \
        --refshapes-size 192 --deris "$RUN/model" --out "$4" --batch-size 16 --device "$DEVICE"
}
extract gate-train 6000 11 "$RUN/cache"
extract gate-tune 1000 12 "$RUN/cache"
extract test 1000 13 "$RUN/cache"
# more re-ranker training pairs (two more seeds, 72k pairs in all: the calibrated re-ranker overfits 18k)
extract gate-train 9000 21 "$RUN/cache-21"
extract gate-train 9000 31 "$RUN/cache-31"

deris-rerank train-gate --arch calibrated \
    --train "$RUN/cache/gate-train" "$RUN/cache-21/gate-train" "$RUN/cache-31/gate-train" --tune "$RUN/cache/gate-tune" \
    --out "$RUN/model/gate" --hidden-dim 128 --n-layers 2 --n-heads 4 --batch-size 256 --warmup-epochs 1 --lr 1e-3 \
    --geometry --epochs 14 --seed "${GATE_SEED:-42}" --device "$DEVICE"
deris-rerank evaluate --cache "$RUN/cache/test" --gate "$RUN/model/gate.safetensors" --out "$RUN/report"

mkdir -p deris_rerank/embedded/deris-tiny
cp "$RUN/model/"{model.safetensors,config.json,tokenizer.model,gate.safetensors,gate.json} deris_rerank/embedded/deris-tiny/

# The bundled example (demo/assets): scene DEMO_SCENE of the RefShapes split "demo" (seed 7, never
# used for training or evaluation) and its expression DEMO_EXPRESSION; the README's demo command
# and tests/test_default_model.py use them.
DEMO_SCENE=${DEMO_SCENE:-12} DEMO_EXPRESSION=${DEMO_EXPRESSION:-1}
mkdir -p demo/assets
python - "$DEMO_SCENE" "$DEMO_EXPRESSION" <<'EOF'
import sys

import numpy as np
from PIL import Image

from deris_rerank.data import RefShapes

scene, expression = RefShapes("demo", num_images=100, seed=7, image_size=(192, 192)).scene(int(sys.argv[1])), int(sys.argv[2])
Image.fromarray(scene.image).save("demo/assets/shapes.png")
np.save("demo/assets/shapes_target.npy", scene.target_mask(expression))
print("demo text:", scene.expressions[expression].text)
EOF
