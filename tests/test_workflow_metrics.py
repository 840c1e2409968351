"""Evaluation metrics on hand-made cases with known answers."""
import numpy as np
import pytest

from deris_rerank.workflow.metrics import evaluate_choices, roc_auc

IOUS = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3], [0.4, 0.4, 0.1], [0.0, 0.0, 0.0]])


def hand_case(p_fail=None):
    return evaluate_choices(
        ious=IOUS,
        inter=(IOUS * 100).astype(np.int64),
        union=np.full(IOUS.shape, 100, dtype=np.int64),
        default=np.array([0, 0, 1, 2]),
        selected=np.array([0, 1, 2, 2]),  # keep, good switch, harmful switch, keep
        union_iou=np.array([0.5, 0.5, 0.5, 0.5]),
        p_fail=p_fail,
    )


def test_hand_made_case_has_the_known_answers():
    m = hand_case(np.array([0.1, 0.9, 0.5, 0.2]))
    assert m["pairs"] == 4
    assert m["q0_miou"] == pytest.approx(37.5)        # (0.9 + 0.2 + 0.4 + 0) / 4
    assert m["selected_miou"] == pytest.approx(45.0)  # (0.9 + 0.8 + 0.1 + 0) / 4
    assert m["oracle_miou"] == pytest.approx(52.5)    # (0.9 + 0.8 + 0.4 + 0) / 4
    assert m["delta_full"] == pytest.approx(7.5)
    assert m["failure_rate"] == pytest.approx(25.0)   # only pair 1: pair 2's best ties Query-0
    assert m["failures"] == 1 and m["switches"] == 2 and m["switch_rate"] == pytest.approx(50.0)
    assert m["delta_fail"] == pytest.approx(60.0)     # 0.8 - 0.2 on the failure pair
    assert m["gap_closed"] == pytest.approx(100.0)
    assert m["harmful_switch_rate"] == pytest.approx(25.0)       # pair 2 lost 0.3 IoU
    assert m["harmful_share_of_switches"] == pytest.approx(50.0)
    assert m["oiou"] == pytest.approx(45.0) and m["q0_oiou"] == pytest.approx(37.5)
    assert m["deris_union_miou"] == pytest.approx(50.0)
    assert m["precision@0.5"] == pytest.approx(50.0) and m["precision@0.8"] == pytest.approx(50.0)
    assert m["precision@0.9"] == pytest.approx(25.0) and m["precision@0.6"] == pytest.approx(50.0)
    assert m["failure_auc"] == pytest.approx(1.0)


def test_auc_counts_ties_as_half_and_matches_brute_force():
    assert roc_auc(np.array([0, 1, 0, 0], bool), np.array([0.5, 0.5, 0.1, 0.1])) == pytest.approx(2.5 / 3)
    assert roc_auc(np.array([1, 1], bool), np.array([0.1, 0.2])) is None
    rng = np.random.default_rng(0)
    labels, scores = rng.random(300) < 0.3, np.round(rng.random(300), 1)
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(labels, scores) == pytest.approx(brute)


def test_no_gate_means_no_change_and_no_auc():
    m = evaluate_choices(IOUS, (IOUS * 100).astype(int), np.full(IOUS.shape, 100), np.array([0, 0, 1, 2]),
                         np.array([0, 0, 1, 2]), np.zeros(4))
    assert m["delta_full"] == 0 and m["switch_rate"] == 0 and m["failure_auc"] is None
    assert m["selected_miou"] == m["q0_miou"] and m["gap_closed"] == pytest.approx(0.0)
