"""RefShapes: determinism, expression semantics (checked by an independent re-reading of the
text), masks, the GRES forms, text cleanliness and the SeqTR write/read round trip."""
from __future__ import annotations

import collections
import math
import pickle
import re

import numpy as np
import pytest

from deris_rerank.data.refcoco import read_seqtr
from deris_rerank.data.refshapes import (
    COLOURS, FAMILIES, MIN_VISIBLE_FRACTION, SHAPES, SIZES, STYLES, Descriptor, Query, RefShapes, SceneObject,
    corpus, referents, write_refshapes,
)
from deris_rerank.errors import InputError
from deris_rerank.tokenizer import clean_text

SIZE = (256, 256)


@pytest.fixture(scope="module")
def ris():
    """About 500 single-target samples (170 images), with their scenes generated once."""
    dataset = RefShapes("train", 170, seed=0)
    return dataset, [dataset.scene(image) for image in range(dataset.num_images)]


@pytest.fixture(scope="module")
def gres():
    dataset = RefShapes("val", 60, seed=1, mode="gres")
    return dataset, [dataset.scene(image) for image in range(dataset.num_images)]


def scene_expressions(scenes):
    """(scene, k, expression) of every sample, in dataset order."""
    for scene in scenes:
        for k, expression in enumerate(scene.expressions):
            yield scene, k, expression


# ------------------------------------------------------------------ independent reading of the text
# A second, deliberately naive interpreter: it parses the text (not the stored query) and picks
# the referents without any margin. Whenever the generator's margin-based checker accepts an
# expression, this plain reading must land on exactly the same objects.

_SIZE_WORDS = {
    "small": "small", "little": "small", "medium sized": "medium", "medium": "medium", "large": "large", "big": "large",
}
_STYLE_WORDS = {
    "solid": "solid", "filled": "solid", "outlined": "outlined", "striped": "striped", "dotted": "dotted", "spotted": "dotted",
}
_NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "crosses": "cross",
          **{generic: None for generic in ("shape", "shapes", "object", "objects", "one")}}
_COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5}
_CORNERS = "top left|top right|bottom left|bottom right"


def parse_noun_phrase(text):
    """{'size', 'colour', 'style', 'shape'} named by "[size] [colour] [style] noun"."""
    named = {}
    for pattern, field, table in ((r"medium sized|small|little|medium|large|big", "size", _SIZE_WORDS),
                                  ("|".join(COLOURS), "colour", {c: c for c in COLOURS}),
                                  ("|".join(_STYLE_WORDS), "style", _STYLE_WORDS)):
        match = re.match(rf"({pattern}) ", text)
        if match:
            named[field] = table[match.group(1)]
            text = text[match.end():]
    assert text in _NOUNS, f"unparsed noun phrase rest {text!r}"
    if _NOUNS[text] is not None:
        named["shape"] = _NOUNS[text]
    return named


def naive_members(objects, named):
    return {i for i, obj in enumerate(objects) if all(getattr(obj, key) == value for key, value in named.items())}


def naive_extreme(objects, members, side):
    coordinate = {"left": lambda o: o.centre[0], "right": lambda o: -o.centre[0],
                  "top": lambda o: o.centre[1], "bottom": lambda o: -o.centre[1]}[side]
    return min(members, key=lambda i: coordinate(objects[i]))


def naive_referents(text, objects, size):
    """(referent set, family) of `text` read naively."""
    height, width = size
    relations = "left of|right of|above|over|below|under|beneath"
    match = re.fullmatch(rf"(?:the |all the )?(.+?) (?:to the )?({relations}) the (.+)", text)
    if match:
        anchor = naive_members(objects, parse_noun_phrase(match.group(3)))
        assert len(anchor) == 1, text
        (a,) = anchor
        relation = {"left of": "left", "right of": "right", "above": "above", "over": "above",
                    "below": "below", "under": "below", "beneath": "below"}[match.group(2)]
        found = set()
        for i in naive_members(objects, parse_noun_phrase(match.group(1))) - {a}:
            dx = objects[a].centre[0] - objects[i].centre[0]
            dy = objects[a].centre[1] - objects[i].centre[1]
            along, across = {
                "left": (dx, abs(dy)), "right": (-dx, abs(dy)), "above": (dy, abs(dx)), "below": (-dy, abs(dx)),
            }[relation]
            if along > 0 and across <= along:
                found.add(i)
        return found, "relation"
    match = re.fullmatch(r"the (first|second|third) (.+) from the (left|right|top|bottom)", text)
    if match:
        members = sorted(naive_members(objects, parse_noun_phrase(match.group(2))),
                         key=lambda i: {"left": 1, "right": -1, "top": 1, "bottom": -1}[match.group(3)]
                         * objects[i].centre[0 if match.group(3) in ("left", "right") else 1])
        return {members[["first", "second", "third"].index(match.group(1))]}, "ordinal"
    match = re.fullmatch(r"the (biggest|largest|smallest) (.+)", text)
    if match:
        members = naive_members(objects, parse_noun_phrase(match.group(2)))
        classes = {i: SIZES.index(objects[i].size) for i in members}
        best = (min if match.group(1) == "smallest" else max)(classes.values())
        return {i for i in members if classes[i] == best}, "comparison"
    position = (re.fullmatch(rf"the (.+) in the ({_CORNERS}) corner", text)
                or re.fullmatch(rf"the (.+) (?:on|at) the ({_CORNERS}|left|right|top|bottom)", text)
                or re.fullmatch(r"the (.+) in the (center|middle of the image|center of the picture)", text))
    if position:
        phrase, where = position.groups()
    else:
        superlatives = {"leftmost": "left", "rightmost": "right", "topmost": "top", "highest": "top", "lowest": "bottom"}
        prefix = re.fullmatch(rf"the ({_CORNERS}|{'|'.join(superlatives)}|left|right|top|bottom) (.+)", text)
        if prefix:
            where, phrase = prefix.groups()
            where = superlatives.get(where, where)
    if position or prefix:
        members = naive_members(objects, parse_noun_phrase(phrase))
        if where.startswith(("center", "middle")):
            distance = {i: math.hypot(objects[i].centre[0] - width / 2, objects[i].centre[1] - height / 2) for i in members}
            return {min(members, key=distance.get)}, "position"
        return {naive_extreme(objects, members, side) for side in where.split()}, "position"
    match = re.fullmatch(r"(?:all the|all|both|the (two|three|four|five)) (.+)", text)
    if match:
        found = naive_members(objects, parse_noun_phrase(match.group(2)))
        stated = 2 if text.startswith("both ") else _COUNTS.get(match.group(1))
        assert stated is None or stated == len(found), text
        return found, "attribute"
    return naive_members(objects, parse_noun_phrase(re.sub(r"^the ", "", text))), "attribute"


# ------------------------------------------------------------------------------------------ tests


def test_same_seed_same_data_in_any_order_other_seed_or_split_differs():
    forward = RefShapes("train", 5, seed=3)
    backward = RefShapes("train", 5, seed=3, cache_size=1)
    assert len(forward) == len(backward) == sum(forward.expressions_per_image(i) for i in range(5))
    for index in reversed(range(len(forward))):
        a, b = forward[index], backward[index]
        assert (a.id, a.image_id, a.text, a.num_targets) == (b.id, b.image_id, b.text, b.num_targets)
        assert np.array_equal(a.load_image(), b.load_image())
        assert np.array_equal(a.target_mask(), b.target_mask())
    assert forward[0].id == "train_000000_0" and forward[0].image_id == "train_000000"
    assert forward[-1].id.startswith("train_000004_")
    first = forward.scene(2)
    again = RefShapes("train", 5, seed=3).scene(2)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.masks, again.masks)
    assert first.objects == again.objects and first.expressions == again.expressions
    for other in (RefShapes("train", 5, seed=4), RefShapes("val", 5, seed=3)):
        assert not np.array_equal(other.scene(2).image, first.image)
        assert [s.text for s in other] != [s.text for s in forward]
    # the drawing does not depend on the mode, the expressions do
    assert np.array_equal(RefShapes("train", 5, seed=3, mode="gres").scene(2).image, first.image)


def test_scenes_are_cached_pickle_and_validate_arguments():
    dataset = RefShapes("train", 3)
    assert dataset.scene(1) is dataset.scene(1)
    sample = dataset[0]
    image = sample.load_image()
    image[:] = 0  # the caller's copy, not the cached scene
    assert dataset.scene(0).image.any() and not dataset.scene(0).image.flags.writeable
    restored = pickle.loads(pickle.dumps(dataset))
    assert [s.text for s in restored] == [s.text for s in dataset]
    assert np.array_equal(restored[0].target_mask(), dataset[0].target_mask())
    assert [s.id for s in dataset[1:3]] == [dataset[1].id, dataset[2].id]
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    for bad in (dict(mode="refcoco"), dict(seed=-1), dict(image_size=(32, 32)), dict(split="")):
        with pytest.raises(InputError):
            RefShapes(**bad)


def test_scene_layout_masks_and_colours(ris):
    for scene in ris[1][:30]:
        count = len(scene.objects)
        assert 3 <= count <= 8
        assert scene.image.dtype == np.uint8 and scene.image.shape == (*SIZE, 3)
        assert scene.masks.dtype == bool and scene.masks.shape == (count, *SIZE)
        assert scene.masks.sum(axis=0).max() == 1  # visible parts are disjoint
        assert len({(o.shape, o.colour, o.size, o.style) for o in scene.objects}) == count
        for obj, mask in zip(scene.objects, scene.masks):
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES and obj.style in STYLES
            assert MIN_VISIBLE_FRACTION <= obj.visible_fraction <= 1
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = obj.bbox
            assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
            if obj.style == "solid":  # the mask sits on pixels of the object's colour
                mean = scene.image[mask].astype(float).mean(axis=0)
                assert np.abs(mean - COLOURS[obj.colour]).max() < 20, (obj, mean)


def test_every_ris_expression_has_exactly_one_referent_by_both_checkers(ris):
    dataset, scenes = ris
    checked = 0
    for scene, k, expression in scene_expressions(scenes):
        assert len(expression.targets) == 1
        (target,) = expression.targets
        assert referents(expression.query, scene.objects, SIZE) == frozenset({target})
        found, family = naive_referents(expression.text, scene.objects, SIZE)
        assert found == {target}, (expression.text, expression.query)
        assert family == expression.family
        mask = scene.target_mask(k)
        assert mask.any() and np.array_equal(mask, scene.masks[target])
        checked += 1
    assert checked >= 450
    assert all(sample.num_targets == 1 for sample in dataset[:40])


def test_family_mix(ris):
    families = collections.Counter(expression.family for _, _, expression in scene_expressions(ris[1]))
    total = sum(families.values())
    mix = {family: round(families[family] / total, 3) for family in FAMILIES}
    print(f"RIS family mix over {total} samples: {mix}")
    for family in FAMILIES:
        assert 0.08 <= mix[family] <= 0.4, mix
    # the spatial families mostly need their spatial term: the noun phrase alone is ambiguous
    needs_space = [len([o for o in scene.objects if e.query.descriptor.matches(o)]) >= 2
                   for scene, _, e in scene_expressions(ris[1]) if e.family != "attribute"]
    assert np.mean(needs_space) > 0.6


def test_gres_multi_target_masks_are_unions_and_no_target_masks_are_empty(gres):
    dataset, scenes = gres
    kinds = collections.Counter()
    for scene, k, expression in scene_expressions(scenes):
        targets = set(expression.targets)
        kinds["none" if not targets else "single" if len(targets) == 1 else "multi"] += 1
        assert referents(expression.query, scene.objects, SIZE) == frozenset(targets)
        assert naive_referents(expression.text, scene.objects, SIZE)[0] == targets, expression.text
        expected = np.zeros(SIZE, dtype=bool)
        for target in targets:
            expected |= scene.masks[target]
        assert np.array_equal(scene.target_mask(k), expected)
        assert expression.query.plural == (len(targets) >= 2)
    samples = dataset[:60]
    assert {s.num_targets for s in samples} >= {0, 1, 2}
    for sample, (scene, k, expression) in zip(samples, scene_expressions(scenes)):
        assert sample.num_targets == len(expression.targets) and sample.text == expression.text
        assert np.array_equal(sample.target_mask(), scene.target_mask(k))
    total = sum(kinds.values())
    print(f"GRES target mix over {total} samples: { {k: round(v / total, 3) for k, v in kinds.items()} }")
    assert kinds["multi"] / total > 0.1 and kinds["none"] / total > 0.1 and kinds["single"] / total > 0.4


def test_texts_survive_clean_text(ris, gres):
    scenes = ris[1] + gres[1]
    texts = [e.text for _, _, e in scene_expressions(scenes)] + corpus(300, seed=5)
    for text in texts:
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", text), text
        assert clean_text(text) == text
    for scene in scenes:
        image_texts = [e.text for e in scene.expressions]
        assert len(set(image_texts)) == len(image_texts)


def test_corpus_is_deterministic_and_covers_the_grammar():
    texts = corpus(400, seed=2)
    assert len(texts) == 400 and texts == corpus(400, seed=2) and texts != corpus(400, seed=3)
    joined = "\n".join(texts)
    for phrase in ("from the", "left of the", "biggest", "smallest", "all ", "in the center", "outlined", "medium sized"):
        assert phrase in joined, phrase
    for name in SHAPES + tuple(COLOURS):
        assert name in joined


def obj(x, y, shape="circle", colour="red", size="medium", style="solid", half=10):
    return SceneObject(shape, colour, size, style, (float(x), float(y)), (x - half, y - half, x + half, y + half), 1.0)


def test_referents_margins_reject_ambiguous_spatial_terms():
    circles = Descriptor(shape="circle")
    left = Query("position", circles, "left")
    assert referents(left, [obj(30, 100), obj(200, 100)], SIZE) == {0}
    assert referents(left, [obj(30, 100), obj(40, 160)], SIZE) == {0, 1}  # tied within the margin: both
    assert referents(left, [obj(200, 100)], SIZE) is None  # a lone circle on the right is not "on the left"
    assert referents(Query("position", circles, "top left"), [obj(30, 30), obj(200, 200)], SIZE) == {0}
    assert referents(Query("position", circles, "top left"), [obj(30, 200), obj(200, 30)], SIZE) == {0, 1}
    anchor = Descriptor(shape="star")
    scene = [obj(40, 100), obj(128, 100, shape="star"), obj(220, 100)]
    assert referents(Query("relation", circles, "left", anchor=anchor), scene, SIZE) == {0}
    assert referents(Query("relation", circles, "right", anchor=anchor), scene, SIZE) == {2}
    unclear = [obj(40, 100), obj(128, 100, shape="star"), obj(100, 60)]  # up-left at ~55 deg: neither
    assert referents(Query("relation", circles, "left", anchor=anchor), unclear, SIZE) is None
    assert referents(Query("relation", circles, "left", anchor=Descriptor(shape="heart")), scene, SIZE) is None
    row = [obj(20, 100), obj(80, 100), obj(140, 100), obj(150, 180)]
    assert referents(Query("ordinal", circles, "left", rank=2), row, SIZE) == {1}
    assert referents(Query("ordinal", circles, "left", rank=3), row, SIZE) is None  # 3rd and 4th too close
    sizes = [obj(50, 50, size="large"), obj(150, 50, size="small"), obj(50, 150, size="small")]
    assert referents(Query("comparison", circles, "biggest"), sizes, SIZE) == {0}
    assert referents(Query("comparison", circles, "smallest"), sizes, SIZE) == {1, 2}
    assert referents(Query("attribute", Descriptor(size="small"), plural=True, count=2), sizes, SIZE) == {1, 2}
    assert referents(Query("attribute", Descriptor(size="small"), plural=True, count=3), sizes, SIZE) is None
    assert referents(Query("attribute", Descriptor(colour="blue")), sizes, SIZE) == frozenset()


def test_write_read_round_trip(tmp_path):
    datasets = [RefShapes("train", 3, seed=7), RefShapes("val", 3, seed=7, mode="gres")]
    path = write_refshapes(tmp_path / "refshapes", datasets)
    assert path.is_file() and len(list((tmp_path / "refshapes" / "images").glob("*.png"))) == 6
    for dataset in datasets:
        read = read_seqtr(path, tmp_path / "refshapes" / "images", dataset.split)
        assert len(read) == len(dataset)
        for position, (ours, theirs) in enumerate(zip(dataset, read)):
            assert (theirs.text, theirs.image_id, theirs.num_targets) == (ours.text, ours.image_id, ours.num_targets)
            assert theirs.id == f"{dataset.split}_{position}_0"  # the reader's id: <split>_<entry>_<expression>
            assert np.array_equal(theirs.target_mask(), ours.target_mask())
            assert np.array_equal(theirs.load_image(), ours.load_image())
    with pytest.raises(InputError):
        write_refshapes(tmp_path / "twice", [datasets[0], RefShapes("train", 1, seed=8)])


def test_refshapes_command_writes_scenes_a_manifest_and_annotations(tmp_path, capsys):
    from deris_rerank import cli
    from deris_rerank.batch import read_manifest
    from deris_rerank.data.refcoco import read_seqtr
    from deris_rerank.images import load_image

    assert cli.main(["refshapes", "--out", str(tmp_path), "--images", "3", "--seed", "5", "--size", "96", "--mode", "gres"]) == 0
    dataset = RefShapes("demo", num_images=3, seed=5, image_size=(96, 96), mode="gres")
    items = read_manifest(tmp_path / "manifest.jsonl")
    assert [item.text for item in items] == [s.text for s in dataset] and [item.id for item in items] == [s.id for s in dataset]
    assert np.array_equal(load_image(items[0].image), dataset[0].load_image())
    annotated = read_seqtr(tmp_path / "refshapes.json", tmp_path / "images", "demo")
    assert [s.num_targets for s in annotated] == [s.num_targets for s in dataset]
    assert cli.main(["refshapes", "--out", str(tmp_path), "--images", "0"]) == 2
