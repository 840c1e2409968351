#!/usr/bin/env bash
# Rebuild the embedded default, deris_rerank/embedded/deris-tiny/, from scratch with the commands a
# user runs: DeRIS-tiny trained on RefShapes (single-target expressions), then fine-tuned on GRES data
# (expressions with no referent or several, DeRIS's non-referent sample conversion), then its set
# re-ranker (the calibrated re-ranker with membership and no-object / one / several heads) trained on
# features extracted from separate gres-mode RefShapes splits; evaluated on held-out gres and ris
# splits; and the bundled demo example.
# Usage: bash weights/build_default.sh [RUN_DIR]   (about 7 h on 2 CPU cores; DEVICE=cuda to use a GPU)
# STEPS / BATCH_SIZE (defaults 6000 and 16) set the first training stage, GRES_STEPS (default 8000)
# the fine-tune. An interrupted stage resumes from its checkpoint.pt when the script is rerun with the
# same settings; finished extraction shards are kept.
set -euo pipefail
RUN=${1:-runs/deris-tiny}
DEVICE=${DEVICE:-auto}
STEPS=${STEPS:-6000}
BATCH_SIZE=${BATCH_SIZE:-16}
GRES_STEPS=${GRES_STEPS:-8000}

# 1. single-target RefShapes (the previous default's DeRIS)
deris-rerank train-deris --preset deris-tiny --out "$RUN/ris" --steps "$STEPS" --batch-size "$BATCH_SIZE" \
    --train-images 200000 --seed 0 --device "$DEVICE"
# 2. fine-tuned on gres-mode RefShapes: no-target and multi-target expressions, existence supervised
deris-rerank train-deris --preset deris-tiny --out "$RUN/gres" --refshapes-mode gres --init "$RUN/ris/model" \
    --tokenizer "$RUN/ris/model/tokenizer.model" --steps "$GRES_STEPS" --batch-size "$BATCH_SIZE" --lr 4e-4 \
    --warmup-steps 200 --train-images 200000 --seed 1 --device "$DEVICE"
MODEL="$RUN/gres/model"

extract() {  # split, images, seed, mode, cache folder
    deris-rerank extract --data refshapes --split "$1" --refshapes-images "$2" --refshapes-seed "$3" \
        --refshapes-mode "$4" --refshapes-size 192 --deris "$MODEL" --out "$5" --batch-size 16 --device "$DEVICE"
}
for seed in 11 21 31; do extract gate-train 9000 "$seed" gres "$RUN/cache-$seed"; done
extract gate-tune 1500 12 gres "$RUN/cache"
extract test 1000 13 gres "$RUN/cache"
extract test 1000 13 ris "$RUN/cache-ris"

# 3. the set re-ranker
deris-rerank train-gate --arch calibrated --sets --set-existence --set-overlap \
    --train "$RUN/cache-11/gate-train" "$RUN/cache-21/gate-train" "$RUN/cache-31/gate-train" --tune "$RUN/cache/gate-tune" \
    --out "$MODEL/gate" --hidden-dim 128 --n-layers 2 --n-heads 4 --batch-size 256 --warmup-epochs 1 --lr 1e-3 \
    --geometry --epochs 14 --seed "${GATE_SEED:-42}" --device "$DEVICE"

# 4. held-out figures: on the caches (set table), and the pipeline's own answers at the images' size
deris-rerank evaluate --cache "$RUN/cache/test" --gate "$MODEL/gate.safetensors" --tune "$RUN/cache/gate-tune" --out "$RUN/report"
deris-rerank evaluate --cache "$RUN/cache-ris/test" --gate "$MODEL/gate.safetensors" --out "$RUN/report-ris"
python weights/score_pipeline.py --deris "$MODEL" --split test --images 1000 --seed 13 --mode gres
python weights/score_pipeline.py --deris "$MODEL" --split test --images 1000 --seed 13 --mode ris

mkdir -p deris_rerank/embedded/deris-tiny
cp "$MODEL/"{model.safetensors,config.json,tokenizer.model,gate.safetensors,gate.json} deris_rerank/embedded/deris-tiny/

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
