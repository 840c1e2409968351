"""DeRIS training pieces: matching, losses, the loop (resume = uninterrupted), tokenizer."""
import dataclasses

import numpy as np
import pytest
import torch

from deris_rerank.data.refshapes import RefShapes, corpus
from deris_rerank.deris.config import DerisConfig
from deris_rerank.tokenizer import Beit3Tokenizer
from deris_rerank.training.attributes import AttributeHead, AttributeHeads, pooled_attribute_loss
from deris_rerank.training.losses import LossWeights, PairTargets, deris_loss, hungarian_match, referent_attribute_loss, round_losses
from deris_rerank.training.tokenizer import train_word_tokenizer
from deris_rerank.settings import DerisTrainSettings
from deris_rerank.training.train_deris import train_deris


def squares(k, size=16):
    masks = torch.zeros(k, size, size)
    for i in range(k):
        masks[i, 2 * i : 2 * i + 4, 3 * i : 3 * i + 5] = 1
    return masks


def dominant_channel_head():
    """An AttributeHead over 2 channels with one 2-class attribute: class 0 when channel 0 dominates, 1 when channel 1 does."""
    head = AttributeHead(2, [2])
    with torch.no_grad():
        head.norm.weight.fill_(1.0), head.norm.bias.zero_()
        head.linear.weight.copy_(torch.tensor([[20.0, -20.0], [-20.0, 20.0]])), head.linear.bias.zero_()
    return head


def test_matching_recovers_the_permutation_and_prefers_referring_slots():
    instances = squares(3)
    order = [2, 0, 1]  # slot s predicts instance order[s]; slots 3.. predict nothing
    logits = torch.full((5, 16, 16), -8.0)
    for slot, obj in enumerate(order):
        logits[slot] = instances[obj] * 16 - 8
    refer = torch.zeros(5, 2)
    slots, objects = hungarian_match(logits, refer, instances, torch.tensor([False, True, False]), LossWeights())
    assert dict(zip(slots.tolist(), objects.tolist())) == {0: 2, 1: 0, 2: 1}
    # two slots with the same mask: only with match_refer > 0 does the "referred"-scoring one win
    logits = torch.stack([instances[0] * 16 - 8, instances[0] * 16 - 8])
    refer = torch.tensor([[-3.0, 3.0], [3.0, -3.0]])
    slots, _ = hungarian_match(logits, refer, instances[:1], torch.tensor([True]), LossWeights(match_refer=2.0))
    assert slots.tolist() == [1]
    slots, _ = hungarian_match(logits, refer.flip(0), instances[:1], torch.tensor([True]), LossWeights())
    assert slots.tolist() == [0]  # mask cost alone: a tie, broken by slot order, not by the scores


def test_losses_vanish_for_a_perfect_prediction_and_label_the_referred_slot():
    instances = squares(2)
    logits = torch.full((1, 4, 16, 16), -20.0)
    logits[0, 1], logits[0, 3] = instances[0] * 40 - 20, instances[1] * 40 - 20
    refer = torch.tensor([[[-9.0, 9.0], [-9.0, 9.0], [-9.0, 9.0], [9.0, -9.0]]])
    perfect = round_losses(logits, refer, PairTargets([instances], [torch.tensor([False, True])]), LossWeights())
    assert perfect["mask"] < 1e-6 and perfect["dice"] < 0.02 and perfect["refer"] < 1e-6
    wrong = round_losses(logits, refer, PairTargets([instances], [torch.tensor([True, False])]), LossWeights())
    assert wrong["refer"] > 1.0  # slot 3 claims "referred" but its instance is not


def test_attribute_loss_reads_the_matched_instance_of_each_slot():
    instances = squares(2)
    logits = torch.full((1, 4, 16, 16), -20.0)
    logits[0, 1], logits[0, 3] = instances[0] * 40 - 20, instances[1] * 40 - 20  # slot 1 <- obj 0, slot 3 <- obj 1
    refer = torch.zeros(1, 4, 2)
    labels = torch.tensor([[2, 0], [1, 3]])  # obj 0: shape 2, colour 0; obj 1: shape 1, colour 3
    shape_logits, colour_logits = torch.zeros(1, 4, 3), torch.zeros(1, 4, 4)
    shape_logits[0, 1, 2] = shape_logits[0, 3, 1] = 30.0
    colour_logits[0, 1, 0] = colour_logits[0, 3, 3] = 30.0
    shape_logits[0, 0, 0] = colour_logits[0, 2, 1] = 30.0  # unmatched slots are not supervised
    right = round_losses(logits, refer, PairTargets([instances], [torch.tensor([True, False])], [labels]), LossWeights(),
                         [shape_logits, colour_logits])
    assert right["attributes"] < 1e-6
    swapped = round_losses(logits, refer, PairTargets([instances], [torch.tensor([True, False])], [labels.flip(0)]),
                           LossWeights(), [shape_logits, colour_logits])
    assert swapped["attributes"] > 10  # the labels of the other instance: every prediction wrong
    assert "attributes" not in round_losses(logits, refer, PairTargets([instances], [torch.tensor([True, False])]), LossWeights())


def test_referent_attribute_loss_reads_the_referent_from_the_non_padding_tokens():
    head = dominant_channel_head()
    text = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 9.0]]])  # two tokens say class 0; the padding says 1
    padding = torch.tensor([[False, False, True]])
    labels = torch.tensor([[1], [0]])  # object 0 has class 1, object 1 class 0
    instances = squares(2)
    refers_to_1 = PairTargets([instances], [torch.tensor([False, True])], [labels])
    assert referent_attribute_loss(text, padding, refers_to_1, head) < 1e-3
    assert referent_attribute_loss(text, padding, refers_to_1._replace(referred=[torch.tensor([True, False])]), head) > 10
    none_or_two = [torch.tensor([False, False]), torch.tensor([True, True])]  # neither counts
    assert referent_attribute_loss(text.expand(2, -1, -1), padding.expand(2, -1), PairTargets([instances] * 2, none_or_two, [labels] * 2), head) == 0


def test_each_attribute_weight_switches_only_its_own_loss():
    instances = squares(2)
    state = {"mask_logits_stride4": torch.zeros(1, 3, 16, 16), "refer_logits": torch.zeros(1, 3, 2),
             "query_before_loopback": torch.randn(1, 3, 4)}
    outputs = {"rounds": [state], "existence_logit": torch.zeros(1, 1), "text_feat": torch.randn(1, 5, 4)}
    targets = PairTargets([instances], [torch.tensor([True, False])], [torch.tensor([[1, 0], [0, 1]])])
    heads, padding = AttributeHeads(4, num_maps=1, vocabulary_sizes=[2, 2]), torch.zeros(1, 5, dtype=torch.bool)
    both = deris_loss(outputs, targets, torch.ones(1), LossWeights(), heads, padding)
    no_query = deris_loss(outputs, targets, torch.ones(1), LossWeights(attributes=0.0), heads, padding)
    no_referent = deris_loss(outputs, targets, torch.ones(1), LossWeights(referent=0.0), heads, padding)
    assert {"attributes", "referent"} <= set(both)
    assert "attributes" not in no_query and "referent" in no_query
    assert "attributes" in no_referent and "referent" not in no_referent
    assert torch.isclose(both["total"], no_query["total"] + 6.0 * both["attributes"])


def test_pooled_attribute_loss_averages_each_instance_region():
    instances = squares(2)  # at 16 px; the map is 8 px: area-resized
    fmap = torch.zeros(1, 2, 8, 8)
    fmap[0, 0] = torch.nn.functional.interpolate(instances[None, :1], size=(8, 8), mode="area")[0, 0] * 4
    fmap[0, 1] = torch.nn.functional.interpolate(instances[None, 1:], size=(8, 8), mode="area")[0, 0] * 4
    head = dominant_channel_head()
    right = pooled_attribute_loss([fmap], [instances], [torch.tensor([[0], [1]])], [head])
    wrong = pooled_attribute_loss([fmap], [instances], [torch.tensor([[1], [0]])], [head])
    assert right < 1e-3 and wrong > 10


def test_word_tokenizer_covers_the_grammar(tmp_path):
    texts = corpus(2000, seed=3)
    path = train_word_tokenizer(texts, tmp_path / "tok.model")
    tokenizer = Beit3Tokenizer(path)
    ids, padding = tokenizer.encode("the second square from the right", 20)
    assert int((padding == 0).sum()) == 8  # bos + one token per word + eos
    assert 3 not in ids.tolist() and int(ids.max()) < DerisConfig.preset("deris-tiny").beit3.vocab_size
    assert 3 in tokenizer.encode("the zebra", 20)[0].tolist()  # unknown word -> <unk>


def test_training_resumes_exactly(tmp_path):
    config = dataclasses.replace(DerisConfig.preset("deris-tiny"), image_size=96)
    data = RefShapes("train", num_images=50, seed=1, image_size=(96, 96))
    tokenizer = train_word_tokenizer(corpus(2000), tmp_path / "tok.model")
    settings = DerisTrainSettings(steps=4, batch_size=2, warmup_steps=2, checkpoint_every=2, num_workers=0)
    straight = train_deris(config, data, tokenizer, tmp_path / "a", settings, log=lambda _: None)
    partial = dataclasses.replace(settings, steps=2)
    train_deris(config, data, tokenizer, tmp_path / "b", partial, log=lambda _: None)
    resumed = train_deris(config, data, tokenizer, tmp_path / "b", settings, log=lambda _: None)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert (tmp_path / "a" / "model" / "model.safetensors").is_file() and (tmp_path / "a" / "model" / "tokenizer.model").is_file()
    torch.manual_seed(settings.seed)  # the initialisation train_deris starts from
    untrained = type(straight)(config).state_dict()
    assert any(not torch.equal(v, untrained[k]) for k, v in straight.state_dict().items() if v.is_floating_point())


def test_object_crops_are_centred_and_zero_outside():
    from deris_rerank.training.pretrain_perception import object_crops

    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30) + 1
    crops = object_crops(image, [(10.0, 5.0), (0.0, 19.0)], 8)
    assert crops.shape == (2, 3, 8, 8)
    assert torch.equal(crops[0, :, 4, 4], image[:, 5, 10])  # centre pixel (row y, column x)
    assert torch.equal(crops[0, :, 0, 0], image[:, 1, 6])
    assert torch.equal(crops[1, :, 4, 4], image[:, 19, 0])
    assert (crops[1, :, 5:, :] == 0).all() and (crops[1, :, :, :4] == 0).all()  # below / left of the image


def test_perception_pretraining_initialises_train_deris(tmp_path):
    from deris_rerank.errors import CheckpointError
    from deris_rerank.fileio import read_safetensors
    from deris_rerank.training.pretrain_perception import PerceptionPretrainSettings, crop_batch, pretrain_perception

    config = dataclasses.replace(DerisConfig.preset("deris-tiny"), image_size=96)
    data = RefShapes("train", num_images=50, seed=1, image_size=(96, 96))
    settings = PerceptionPretrainSettings(steps=2, objects_per_step=8, crop_size=32)
    crops, labels = crop_batch(data, config, settings, step=0)
    again, same = crop_batch(data, config, settings, step=0)
    assert crops.shape[1:] == (3, 32, 32) and labels.shape == (crops.shape[0], 4) and crops.shape[0] >= 8
    assert torch.equal(crops, again) and torch.equal(labels, same)
    swin = pretrain_perception(config, data, tmp_path / "perception.safetensors", settings, log=lambda _: None)
    saved = read_safetensors(tmp_path / "perception.safetensors")
    torch.manual_seed(settings.seed)
    untrained = type(swin)(config.swin).state_dict()
    assert any(not torch.equal(v, untrained[k]) for k, v in saved.items() if v.is_floating_point())

    tokenizer = train_word_tokenizer(corpus(2000), tmp_path / "tok.model")
    none = DerisTrainSettings(steps=0, batch_size=2, num_workers=0)
    model = train_deris(config, data, tokenizer, tmp_path / "run", none, log=lambda _: None,
                        init_perception=tmp_path / "perception.safetensors")
    for key, value in saved.items():
        assert torch.equal(model.swin.state_dict()[key], value), key
    other = dataclasses.replace(config, swin=dataclasses.replace(config.swin, embed_dim=16))
    with pytest.raises(CheckpointError, match="not a Swin of the"):
        train_deris(other, data, tokenizer, tmp_path / "run2", none, log=lambda _: None,
                    init_perception=tmp_path / "perception.safetensors")


def test_non_referent_conversion_borrows_expressions_that_refer_to_nothing_here():
    from deris_rerank.data.refshapes import referents
    from deris_rerank.training.train_deris import non_referent_expression

    data = RefShapes("train", num_images=40, seed=2, image_size=(96, 96), mode="gres")
    rng = np.random.default_rng(0)
    found = 0
    for image in range(20):
        expression = non_referent_expression(data, image, rng)
        if expression is None:
            continue
        found += 1
        assert expression.targets == ()
        assert referents(expression.query, data.scene(image).objects, data.image_size) == frozenset()
        assert expression.text not in {e.text for e in data.scene(image).expressions}
    assert found >= 15


def test_turned_around_expressions_reverse_the_direction_and_find_their_referents_again():
    from deris_rerank.data.refshapes import referents
    from deris_rerank.data.refshapes.vocabulary import TURNED_AROUND
    from deris_rerank.training.train_deris import turned_around_expression

    data = RefShapes("train", num_images=120, seed=5, image_size=(160, 160), mode="gres")
    rng = np.random.default_rng(0)
    found = {}
    for image in range(data.num_images):
        scene = data.scene(image)
        for expression in scene.expressions:
            turned = turned_around_expression(expression, scene, data.image_size, rng)
            if expression.query.direction not in TURNED_AROUND:
                assert turned is None  # attributes and "in the middle" have nothing to turn
                continue
            if turned is None:
                continue
            assert turned.query.direction == TURNED_AROUND[expression.query.direction] != expression.query.direction
            assert frozenset(turned.targets) == referents(turned.query, scene.objects, data.image_size)
            assert len(turned.targets) != 1 if turned.query.plural else len(turned.targets) <= 1
            found.setdefault(expression.family, []).append(len(turned.targets))
    assert set(found) == {"position", "relation", "ordinal", "comparison"}
    assert found["relation"].count(0) > 0.7 * len(found["relation"])  # a relation turned around mostly refers to nothing
    assert all(n == 1 for n in found["position"])  # the other side of a unique referent: another object


def test_gres_stream_converts_referent_pairs_and_ris_stream_never_does(tmp_path):
    from deris_rerank.training.train_deris import RefShapesStream

    config = dataclasses.replace(DerisConfig.preset("deris-tiny"), image_size=96)
    tokenizer = train_word_tokenizer(corpus(2000), tmp_path / "tok.model")

    def referred_counts(mode, rate, steps=6):
        data = RefShapes("train", num_images=30, seed=1, image_size=(96, 96), mode=mode)
        stream = iter(RefShapesStream(data, tokenizer, config, batch_size=8, start_step=0, seed=0, non_referent_rate=rate))
        return [int(text[2].sum()) for _ in range(steps) for image in next(stream) for text in image[-1]]

    assert 0 not in referred_counts("ris", 1.0)  # one referent each: ris data has no no-target pairs to make
    kept, converted = referred_counts("gres", 0.0), referred_counts("gres", 1.0)
    assert len(kept) == len(converted) and converted.count(0) > kept.count(0)
    assert all(c == 0 for c in converted)  # rate 1: every pair with referents became a no-target pair

    def texts_per_image(mode, rate, steps=6):
        data = RefShapes("train", num_images=30, seed=1, image_size=(96, 96), mode=mode)
        stream = iter(RefShapesStream(data, tokenizer, config, batch_size=64, start_step=0, seed=0, turn_around_rate=rate))
        return [len(image[-1]) for _ in range(steps) for image in next(stream)]

    assert texts_per_image("ris", 1.0) == texts_per_image("ris", 0.0)  # ris data: no turned-around no-target pairs
    turned, kept = texts_per_image("gres", 1.0), texts_per_image("gres", 0.0)
    assert sum(turned) / len(turned) > sum(kept) / len(kept) + 0.3  # gres: turned versions join their images


def test_train_deris_fine_tunes_a_whole_model_of_the_same_preset(tmp_path):
    from deris_rerank.checkpoints import save_deris
    from deris_rerank.deris.model import DerisModel
    from deris_rerank.errors import CheckpointError

    config = dataclasses.replace(DerisConfig.preset("deris-tiny"), image_size=96)
    data = RefShapes("train", num_images=20, seed=1, image_size=(96, 96), mode="gres")
    tokenizer = train_word_tokenizer(corpus(2000), tmp_path / "tok.model")
    torch.manual_seed(5)
    start = DerisModel(config)
    save_deris(start, tmp_path / "start")
    none = DerisTrainSettings(steps=0, batch_size=2, num_workers=0)
    model = train_deris(config, data, tokenizer, tmp_path / "run", none, log=lambda _: None, init_model=tmp_path / "start")
    for key, value in start.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    other = dataclasses.replace(config, hidden_dim=32)
    with pytest.raises(CheckpointError, match="fine-tune a model of the same preset"):
        train_deris(other, data, tokenizer, tmp_path / "run2", none, log=lambda _: None, init_model=tmp_path / "start")
