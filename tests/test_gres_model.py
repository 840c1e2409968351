"""The provisional GRES model in the checkout (weights/deris-tiny-gres: DeRIS-tiny fine-tuned on
gres-mode RefShapes + its set re-ranker): set answers end to end on held-out pairs.

The floors sit a few points below what was measured on these pairs (docs/training.md#gres-training),
so a regression anywhere in the chain of a set answer (the existence head, the set re-ranker's
kind and membership heads, its rule, the union of the chosen masks) fails.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRES_MODEL = REPO / "weights" / "deris-tiny-gres"
pytestmark = pytest.mark.skipif(not (GRES_MODEL / "gate.safetensors").is_file(), reason=f"no GRES model in {GRES_MODEL}")

# measured on these 298 pairs (60 no-target, 66 multi-target; Intel Xeon, torch 2.13.0+cpu): gIoU 65.55,
# N-acc 78.33, multi-target gIoU 70.98, harmful 5.37 %, DeRIS's own union answer gIoU 57.09
FLOORS = {"giou": 62.0, "n_acc": 72.0, "giou_multi": 66.0}
HARMFUL_CEILING = 8.0  # % of pairs more than 0.01 IoU below DeRIS's union answer
DERIS_UNION_GIOU_FLOOR = 53.0


def test_set_answers_on_held_out_gres_refshapes_pairs():
    from deris_rerank import Pipeline
    from deris_rerank.data import RefShapes
    from deris_rerank.workflow.set_metrics import score_results

    pipe = Pipeline(deris=GRES_MODEL, device="cpu")
    assert pipe.answer == "set"
    samples = RefShapes("ci-accuracy-gres", num_images=100, seed=2025, image_size=(192, 192), mode="gres")
    results = pipe.batch([(s.image, s.text) for s in samples], batch_size=16)
    ours, union = score_results(results, samples), score_results(results, samples, answer="deris_mask")
    assert ours["pairs"] >= 200 and ours["pairs_none"] >= 20 and ours["pairs_multi"] >= 20
    for key, floor in FLOORS.items():
        assert ours[key] >= floor, f"{key} {ours[key]:.2f} below the floor {floor}"
    assert ours["harmful_rate"] <= HARMFUL_CEILING, f"harmful {ours['harmful_rate']:.2f}% above {HARMFUL_CEILING}%"
    assert union["giou"] >= DERIS_UNION_GIOU_FLOOR, f"DeRIS union gIoU {union['giou']:.2f} below {DERIS_UNION_GIOU_FLOOR}"
    assert ours["giou"] > union["giou"]  # the set re-ranker's answer beats DeRIS's own
