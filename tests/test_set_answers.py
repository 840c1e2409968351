"""Answers that are sets of candidates (GRES): packed masks, gRefCOCO's metrics, the set rule, the set
re-ranker (training, points, files) and the Result a user sees."""
import itertools

import numpy as np
import pytest
import torch

from deris_rerank.bitmasks import pack_masks, unpack_masks
from deris_rerank.errors import InputError
from deris_rerank.rerank.calibrated import CalibratedConfig, CalibratedReranker, candidate_overlaps
from deris_rerank.rerank.decision import DecisionRule, SetRule, apply_set_rule
from deris_rerank.rerank.files import load_gate, save_calibrated
from deris_rerank.rerank.gate_data import GateData, SetData
from deris_rerank.rerank.text_context import TextContext
from deris_rerank.result import Result
from deris_rerank.settings import CalibratedSettings
from deris_rerank.workflow.set_metrics import answer_ious, oracle_sets, set_answer_metrics
from deris_rerank.workflow.train_calibrated import pick_points, train_calibrated

S = 8  # side of the hand-made masks


def square(top, left, size=3):
    mask = np.zeros((S, S), bool)
    mask[top:top + size, left:left + size] = True
    return mask


def hand_sets(candidates, targets, num_targets):
    """SetData of P pairs from candidate masks bool [P, N, S, S] and target masks bool [P, S, S]."""
    candidates, targets = np.asarray(candidates), np.asarray(targets)
    area = torch.from_numpy(candidates.sum(axis=(-2, -1)))
    return SetData(area=area, target_area=torch.from_numpy(targets.sum(axis=(-2, -1))),
                   num_targets=torch.tensor(num_targets), instance=torch.full(area.shape, -1), instance_iou=torch.zeros(area.shape),
                   masks=pack_masks(torch.from_numpy(candidates)), target_masks=pack_masks(torch.from_numpy(targets)), mask_size=S)


def test_packed_masks_round_trip_and_refuse_the_wrong_size():
    masks = torch.rand(3, 4, 13, 11) > 0.5
    packed = pack_masks(masks)
    assert packed.shape == (3, 4, 18) and packed.dtype == torch.uint8  # ceil(143 / 8)
    assert np.array_equal(unpack_masks(packed.numpy(), (13, 11)), masks.numpy())
    with pytest.raises(InputError, match="not 10 x 10"):
        unpack_masks(packed.numpy(), (10, 10))


def test_grefcoco_rules_on_hand_made_pairs():
    a, b, far = square(0, 0), square(4, 4), square(5, 0)
    empty = np.zeros((S, S), bool)
    sets = hand_sets(
        candidates=[[a, b], [a, b], [a, b], [a, far]],
        targets=[a | b, empty, a, a],
        num_targets=[2, 0, 1, 1],
    )
    chosen = np.array([[True, True],     # both objects: IoU 1
                       [False, False],   # no-target, answered empty: a true positive, IoU 1
                       [False, False],   # target, answered empty: a false positive, IoU 0, U = target area
                       [True, True]])    # a and a far square: IoU 9 / 18
    m = set_answer_metrics(sets, chosen)
    assert answer_ious(sets, chosen).tolist() == [1.0, 1.0, 0.0, 0.5]
    assert m["giou"] == pytest.approx(62.5)
    assert m["ciou"] == pytest.approx(100 * (18 + 0 + 0 + 9) / (18 + 0 + 9 + 18))
    assert m["n_acc"] == pytest.approx(100.0) and m["t_acc"] == pytest.approx(200 / 3)
    assert m["giou_none"] == pytest.approx(100.0) and m["giou_single"] == pytest.approx(25.0) and m["giou_multi"] == 100.0
    assert m["pr@0.7"] == pytest.approx(100 / 3)
    # a no-target pair answered with an object: IoU 0 and its area in cIoU's denominator (a false negative)
    wrong = chosen.copy()
    wrong[1] = [True, False]
    m2 = set_answer_metrics(sets, wrong, reference=chosen)
    assert answer_ious(sets, wrong)[1] == 0.0 and m2["n_acc"] == 0.0
    assert m2["ciou"] == pytest.approx(100 * 27 / (18 + 9 + 9 + 18))
    assert m2["harmful_rate"] == pytest.approx(25.0) and m2["changed_rate"] == pytest.approx(25.0)


def test_oracle_set_is_the_best_union_and_empty_for_no_target():
    rng = np.random.default_rng(0)
    candidates = rng.random((6, 5, S, S)) > 0.6
    targets = rng.random((6, S, S)) > 0.5
    targets[2] = False
    sets = hand_sets(candidates, targets, [3, 1, 0, 2, 1, 4])
    oracle = oracle_sets(sets)
    assert not oracle[2].any()
    best = answer_ious(sets, oracle)
    for p in range(6):  # brute force over every subset, empty included
        subsets = np.array(list(itertools.product((False, True), repeat=5)))
        brute = max(answer_ious(hand_sets(candidates[[p] * len(subsets)], targets[[p] * len(subsets)],
                                          [int(sets.num_targets[p])] * len(subsets)), subsets))
        assert best[p] == pytest.approx(brute)


def test_set_rule_answers_none_several_or_the_single_choice():
    kind = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]).log_softmax(-1)
    member = torch.tensor([[3.0, 3.0, -3.0], [3.0, -3.0, 3.0], [3.0, 3.0, 3.0], [-3.0, -3.0, -3.0]])
    single = torch.tensor([1, 1, 2, 0])
    scores = torch.tensor([[0.9, 0.1, 0.7]] * 4)
    chosen, p_none, p_several, _ = apply_set_rule(SetRule(0.5, 0.5, 0.5), single, kind, member, scores)
    assert chosen.tolist() == [[False, False, False], [True, False, True], [False, False, True], [True, False, False]]
    assert p_none[0] > 0.9 and p_several[1] > 0.9  # the last pair: several but no member -> the single choice
    never_none = apply_set_rule(SetRule(1.0, 0.5, 0.5), single, kind, member, scores)[0]
    assert never_none[0].tolist() == [False, True, False]


def test_set_rule_defers_to_derises_union_only_when_the_reranker_is_unsure():
    kind = torch.tensor([[5.0, 0.0, 0.0], [0.4, 0.5, 0.3], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]).log_softmax(-1)
    member = torch.tensor([[-3.0, -3.0, -3.0]] * 3 + [[-3.0, 0.1, -3.0]])  # |2 sigmoid - 1|: 0.905, and 0.05
    single = torch.tensor([1, 1, 1, 1])
    scores = torch.tensor([[0.9, 0.1, 0.7], [0.9, 0.1, 0.7], [0.2, 0.1, 0.3], [0.9, 0.1, 0.7]])
    own = apply_set_rule(SetRule(0.5, 0.5, 0.5), single, kind, member, scores)[0]
    deferring = apply_set_rule(SetRule(0.5, 0.5, 0.5, tau_defer=0.9, union_threshold=0.6), single, kind, member, scores)[0]
    assert own.tolist() == [[False, False, False], [False, True, False], [False, True, False], [False, True, False]]
    # sure pairs keep the re-ranker's answer; unsure ones are DeRIS's union: pair 1 of how many
    # (largest kind probability ~0.37), pair 3 of a candidate's membership (0.05)
    assert deferring.tolist() == [[False, False, False], [True, False, True], [False, True, False], [True, False, True]]
    never = apply_set_rule(SetRule(0.5, 0.5, 0.5, tau_defer=0.0), single, kind, member, scores)[0]
    assert torch.equal(never, own)


B, N, D, T = 24, 6, 8, 5
CONFIG = CalibratedConfig(query_dim=D, text_dim=D, hidden_dim=16, n_layers=1, n_heads=2, n_queries=N, dropout=0.0,
                          sets=True, set_inputs=("existence", "overlap"))


def random_inputs(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    refer = torch.randn(batch, N, 2, generator=g)
    text = TextContext(refer, torch.randn(batch, N, D, generator=g), torch.randn(batch, T, D, generator=g),
                       torch.zeros(batch, T, dtype=torch.bool))
    return (torch.randn(batch, N, D, generator=g), refer.softmax(-1)[..., 0], torch.rand(batch, N, 4, generator=g),
            torch.rand(batch, N, 675, generator=g)), text, torch.rand(batch, generator=g)


def test_set_reranker_permutes_with_its_candidates_and_needs_existence():
    torch.manual_seed(0)
    model = CalibratedReranker(CONFIG, DecisionRule(tau=0.0, margin_pred=0.0)).eval()
    args, text, existence = random_inputs()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    moved = model.outputs(*(x[:, perm] for x in args), TextContext(text.refer_logits[:, perm], text.cognition_embed[:, perm],
                                                                   text.text_feat, text.text_padding), existence)
    base = model.outputs(*args, text, existence)
    assert torch.allclose(moved.member, base.member[:, perm], atol=1e-5) and torch.allclose(moved.kind, base.kind, atol=1e-5)
    decision = model.decide(*args, text=text, existence=existence)
    assert decision.chosen.shape == (B, N) and decision.p_none.shape == (B,)
    with pytest.raises(InputError, match="existence"):
        model.decide(*args, text=text)
    overlaps = candidate_overlaps(torch.cat([args[3][:, :1], args[3][:, :1], args[3][:, 2:]], dim=1), args[1])
    assert torch.allclose(overlaps[:, 0, 0], torch.ones(B)) and torch.allclose(overlaps[:, 1, 0], torch.ones(B))


def set_gate_data(pairs=96, seed=3):
    """Synthetic GRES pairs whose kind the existence input gives away: no target when existence < 0.3."""
    args, text, existence = random_inputs(seed, pairs)
    rng = np.random.default_rng(seed)
    kinds = np.where(existence.numpy() < 0.3, 0, rng.integers(1, 3, pairs))
    candidates = rng.random((pairs, N, S, S)) > 0.7
    targets = np.zeros((pairs, S, S), bool)
    for p in range(pairs):
        for k in range(int(kinds[p])):
            targets[p] |= candidates[p, k]
    sets = hand_sets(candidates, targets, kinds.tolist())
    inter = torch.from_numpy((candidates & targets[:, None]).sum(axis=(-2, -1)))
    union = torch.from_numpy((candidates | targets[:, None]).sum(axis=(-2, -1)))
    ious = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(()))
    provenance = [{"config": {"score_threshold": 0.5, "mask_threshold": 0.5}}]
    return GateData(args[0], args[1], args[2], args[3], ious.float(), inter, union, ious[:, 0].float(), existence,
                    [str(i) for i in range(pairs)], ["synthetic"] * pairs, provenance, text, sets)


def test_set_reranker_trains_picks_points_and_round_trips_through_its_files(tmp_path):
    data = set_gate_data()
    settings = CalibratedSettings(hidden_dim=16, n_layers=1, n_heads=2, epochs=25, warmup_epochs=1, batch_size=32, lr=3e-3,
                                  sets=True, set_existence=True, dropout=0.0)
    reranker = train_calibrated(data, settings, log=lambda _: None)
    report = pick_points(reranker, data, settings)
    assert set(reranker.set_operating_points) == {"tuned", "conservative"} and reranker.set_rule == reranker.set_operating_points["tuned"]
    assert report["set_tune_pairs"] == len(data) and "tuned_set_tune_giou" in report
    p_none = reranker.outputs(data.query_feat, data.scores, data.mask_stats, data.grid, data.text, data.existence).kind.softmax(-1)[:, 0]
    no_target = data.sets.kind == 0
    assert p_none[no_target].mean() > p_none[~no_target].mean() + 0.3  # it learned absence from the existence input
    written = save_calibrated(reranker, tmp_path / "set")
    loaded = load_gate(written)
    assert loaded.config.sets and loaded.config.set_inputs == ("existence", "overlap")[:1]
    assert loaded.set_rule == reranker.set_rule and loaded.set_operating_points == reranker.set_operating_points
    a = reranker.decide(data.query_feat, data.scores, data.mask_stats, data.grid, data.text, data.existence)
    b = loaded.decide(data.query_feat, data.scores, data.mask_stats, data.grid, data.text, data.existence)
    assert torch.equal(a.chosen, b.chosen)
    conservative = load_gate(written, operating_point="conservative")
    assert conservative.set_rule == reranker.set_operating_points["conservative"]


def test_a_set_reranker_needs_caches_with_the_set_fields():
    data = set_gate_data()
    data.sets = None
    with pytest.raises(InputError, match="lacks the set fields"):
        train_calibrated(data, CalibratedSettings(hidden_dim=16, n_layers=1, n_heads=2, epochs=1, sets=True), log=lambda _: None)


def make_result(**changes):
    values = dict(text="the purple star", mask=np.zeros((4, 5), bool), selected_rank=None, switched=True, p_fail=0.2,
                  scores=[0.7, 0.2], slots=[1, 0], deris_mask=np.zeros((4, 5), bool), default_mask=np.ones((4, 5), bool),
                  existence=0.4, timings={}, answer="set", selected_ranks=[], p_no_target=0.93, member_scores=[0.1, 0.05])
    return Result(**{**values, **changes})


def test_a_set_answer_says_no_object_or_how_many_in_words_and_json():
    none = make_result()
    assert none.object_count == 0 and none.selected_slot is None and none.mask_empty
    assert "no object matches 'the purple star'" in none.notes
    data = none.to_json()
    assert data["answer"] == "set" and data["selected"] is None and data["selected_set"] == [] and data["objects"] == 0
    assert data["p_no_target"] == pytest.approx(0.93)
    several = make_result(text="all the red shapes", mask=np.ones((4, 5), bool), selected_rank=0, selected_ranks=[0, 1])
    assert several.object_count == 2 and "2 objects match 'all the red shapes'" in several.notes
    single = make_result(answer="single", selected_rank=1, selected_ranks=None, p_no_target=None, member_scores=None)
    assert single.selected_ranks == [1] and single.object_count == 1 and not any("no object" in n for n in single.notes)


def test_results_are_scored_at_their_own_size_by_the_same_rules():
    from deris_rerank.data.sample import ReferringSample
    from deris_rerank.workflow.set_metrics import score_results

    a, b = square(0, 0), square(4, 4)
    empty = np.zeros((S, S), bool)
    targets = [a | b, empty, a]
    samples = [ReferringSample(str(k), "s", lambda: None, "t", target_mask=lambda m=m: m, num_targets=n)
               for k, (m, n) in enumerate(zip(targets, [2, 0, 1]))]
    results = [make_result(mask=m, deris_mask=d) for m, d in ((a | b, a), (empty, b), (b, a))]
    m = score_results(results, samples)
    assert m["giou"] == pytest.approx(100 * (1 + 1 + 0) / 3) and m["n_acc"] == 100.0 and m["t_acc"] == 100.0
    assert m["harmful_rate"] == pytest.approx(100 / 3)  # the third pair: IoU 0 against DeRIS's 1
    assert score_results(results, samples, answer="deris_mask")["giou"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)
