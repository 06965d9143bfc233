"""The demo world: deterministic, labels true to the drawn objects, captions informative but incomplete, caches
that are reused only when they match."""

from __future__ import annotations

import json

import numpy as np
import pytest

import difffeat.demo.data as dd
from difffeat.data import DataError, Dataset, load_image
from difffeat.demo.data import (
    CLASSES,
    DIGIT_NAMES,
    VOCAB,
    DemoParams,
    dataset_fingerprint,
    demo_dataset,
    generate_demo_scenes,
    load_demo_dataset,
    make_demo_dataset,
    make_scene,
    save_demo_dataset,
    tokenize_caption,
)

SMALL = {"n_train": 24, "n_val": 8, "n_test": 8}


@pytest.fixture(scope="module")
def scenes() -> list[dd.DemoScene]:
    """Enough val scenes for caption statistics (about 3500 captions), generated once, without typos so that
    every mention can be found in the text."""
    return generate_demo_scenes(DemoParams(n_train=0, n_val=1500, n_test=0, typo_rate=0.0), "val")


def _same(a: Dataset, b: Dataset) -> bool:
    return a.classes == b.classes and all(
        x.id == y.id and x.captions == y.captions and x.labels == y.labels and np.array_equal(x.image, y.image)
        for name in ("train", "val", "test")
        for x, y in zip(a.split(name), b.split(name), strict=True)
    )


def _surface_forms(cls: int) -> set[str]:
    """Tokens by which a caption can name a class."""
    if cls < 10:
        return {DIGIT_NAMES[cls], dd._plural(DIGIT_NAMES[cls]), str(cls)}
    words = {t for w in dd._SHAPE_WORDS[CLASSES[cls]] for t in tokenize_caption(w)} - {"round"}
    return words | {dd._plural(w) for w in words}


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_different() -> None:
    a, b, c = make_demo_dataset(**SMALL), make_demo_dataset(**SMALL), make_demo_dataset(**SMALL, seed=1)
    assert _same(a, b) and dataset_fingerprint(a) == dataset_fingerprint(b)
    assert dataset_fingerprint(a) != dataset_fingerprint(c)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a.split("train"), c.split("train"), strict=True))


def test_sample_does_not_depend_on_split_size() -> None:
    small, big = DemoParams(n_train=3), DemoParams(n_train=50)
    for i in range(3):
        s, b = make_scene(small, "train", i), make_scene(big, "train", i)
        assert np.array_equal(s.image, b.image) and s.captions == b.captions


# ------------------------------------------------------------------------------------------------ images and labels


def test_shapes_dtypes_and_ids() -> None:
    ds = make_demo_dataset(**SMALL)
    assert ds.name == "demo" and 10 <= ds.num_classes <= 16 and not ds.single_label
    assert {n: len(s) for n, s in ds.splits.items()} == {"train": 24, "val": 8, "test": 8}
    ids = [s.id for sp in ds.splits.values() for s in sp]
    assert len(set(ids)) == len(ids)
    for s in ds.split("train"):
        assert isinstance(s.image, np.ndarray) and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert load_image(s).size == (32, 32)
    assert make_demo_dataset(n_train=2, n_val=0, n_test=0, image_size=48).split("train")[0].image.shape == (48, 48, 3)


def test_labels_are_the_drawn_objects() -> None:
    params = DemoParams(n_train=200)
    scenes = generate_demo_scenes(params, "train")
    ds = make_demo_dataset(n_train=200, n_val=0, n_test=0)
    digit_targets = dd._digits()[1]
    counts = []
    for scene, sample in zip(scenes, ds.split("train"), strict=True):
        assert sample.labels == scene.labels == tuple(sorted({o.cls for o in scene.objects}))
        assert 1 <= len(sample.labels) <= 4 and 1 <= len(scene.objects) <= 4
        counts.append(len(scene.objects))
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and 8 <= y1 - y0 <= 16
            assert (o.glyph == -1) == (o.cls >= 10)
            assert o.glyph == -1 or digit_targets[o.glyph] == o.cls
    assert set(counts) == {1, 2, 3, 4}


def test_objects_are_drawn_in_their_boxes(monkeypatch) -> None:
    """Re-render with invisible objects (same random stream): what changes is exactly the objects, each clearly
    visible and only inside its box."""
    params = DemoParams(n_train=40)
    full = generate_demo_scenes(params, "train")

    def invisible(real):  # still consumes the random draws the real mask does
        return lambda *args: np.zeros_like(real(*args))

    for name in ("_glyph_mask", "_shape_mask"):
        monkeypatch.setattr(dd, name, invisible(getattr(dd, name)))
    empty = generate_demo_scenes(params, "train")
    for with_objects, without in zip(full, empty, strict=True):
        assert with_objects.captions == without.captions
        diff = np.abs(with_objects.image.astype(int) - without.image).max(-1)
        inside = np.zeros(diff.shape, bool)
        for x0, y0, x1, y1 in (o.box for o in with_objects.objects):
            inside[y0:y1, x0:x1] = True
            assert diff[y0:y1, x0:x1].max() >= 40
        assert diff[~inside].max() == 0


def test_glyph_pools_are_disjoint_and_respected() -> None:
    pools = {name: set(dd.glyph_pool(name)) for name in dd.SPLIT_NAMES}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    assert set().union(*pools.values()) == set(range(1797))
    params = DemoParams(n_train=60, n_val=60, n_test=60)
    for name in dd.SPLIT_NAMES:
        used = {o.glyph for s in generate_demo_scenes(params, name) for o in s.objects if o.glyph >= 0}
        assert used and used <= pools[name]


# ------------------------------------------------------------------------------------------------ captions


def test_caption_counts(scenes: list[dd.DemoScene]) -> None:
    n_caps = np.array([len(s.captions) for s in scenes])
    assert n_caps.min() >= 1 and n_caps.max() <= 3 and (n_caps >= 2).mean() > 0.8
    assert all(len(s.mentions) == len(s.captions) for s in scenes)
    assert all(c == c.lower() and c.strip() for s in scenes for c in s.captions)


def test_mentions_are_in_the_text(scenes: list[dd.DemoScene]) -> None:
    for s in scenes:
        for caption, mentioned in zip(s.captions, s.mentions, strict=True):
            tokens = set(tokenize_caption(caption))
            assert tokens <= set(VOCAB), caption
            for cls in mentioned:
                assert tokens & _surface_forms(cls), (caption, CLASSES[cls])


def test_captions_informative_but_incomplete(scenes: list[dd.DemoScene]) -> None:
    caps = [(set(s.labels), set(m)) for s in scenes for m in s.mentions]
    assert np.mean([bool(labels & m) for labels, m in caps]) == 1.0  # every caption names something present
    multi = [(labels, m) for labels, m in caps if len(labels) > 1]
    assert 0.5 < np.mean([not labels <= m for labels, m in multi]) < 0.97  # but mostly not everything
    missed = [bool(set(s.labels) - set().union(*map(set, s.mentions))) for s in scenes]
    assert 0.1 < np.mean(missed) < 0.6  # some labels are in no caption at all: text alone is not enough


def test_wrong_mention_rate(scenes: list[dd.DemoScene]) -> None:
    wrong = [bool(set(m) - set(s.labels)) for s in scenes for m in s.mentions]
    assert abs(np.mean(wrong) - 0.05) < 0.015
    none = generate_demo_scenes(DemoParams(n_val=300, wrong_mention_rate=0.0), "val")
    assert not any(set(m) - set(s.labels) for s in none for m in s.mentions)


def test_typos_leave_the_vocabulary() -> None:
    scenes = generate_demo_scenes(DemoParams(n_val=100, typo_rate=1.0), "val")
    outside = [bool(set(tokenize_caption(c)) - set(VOCAB)) for s in scenes for c in s.captions]
    assert np.mean(outside) > 0.9


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(n_train=-1)
    with pytest.raises(ValueError):
        make_demo_dataset(image_size=8)
    with pytest.raises(ValueError):
        make_demo_dataset(wrong_mention_rate=1.5)


# ------------------------------------------------------------------------------------------------ storage and cache


def test_save_load_round_trip(tmp_path) -> None:
    ds = make_demo_dataset(**SMALL)
    save_demo_dataset(ds, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"images_labels.npz", "captions.jsonl", "classes.txt", "meta.json"}
    back = load_demo_dataset(tmp_path)
    assert _same(ds, back) and back.notes == ds.notes and back.name == "demo"
    assert back.split("train")[0].image.dtype == np.uint8
    no_val = make_demo_dataset(n_train=3, n_val=0, n_test=2)
    save_demo_dataset(no_val, tmp_path / "no_val")
    assert _same(load_demo_dataset(tmp_path / "no_val"), no_val)


def test_load_detects_tampering(tmp_path) -> None:
    save_demo_dataset(make_demo_dataset(**SMALL), tmp_path)
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["captions"][0] += " extra"
    (tmp_path / "captions.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="content hash"):
        load_demo_dataset(tmp_path)
    with pytest.raises(DataError, match=r"meta\.json"):
        load_demo_dataset(tmp_path / "missing")
    npz = tmp_path / "images_labels.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot read"):
        load_demo_dataset(tmp_path)


def test_cache_is_reused(tmp_path, monkeypatch) -> None:
    first = demo_dataset(tmp_path, **SMALL)

    def fail(params: DemoParams) -> Dataset:
        raise AssertionError("regenerated although a matching cache exists")

    monkeypatch.setattr(dd, "_generate", fail)
    assert _same(demo_dataset(tmp_path, **SMALL), first)


def test_cache_mismatch_or_damage_regenerates(tmp_path, monkeypatch) -> None:
    demo_dataset(tmp_path, **SMALL)
    calls = []
    real = dd._generate
    monkeypatch.setattr(dd, "_generate", lambda p: calls.append(p) or real(p))
    other = demo_dataset(tmp_path, **{**SMALL, "n_train": 10})
    assert len(other.split("train")) == 10 and len(calls) == 1
    assert json.loads((tmp_path / "meta.json").read_text())["params"]["n_train"] == 10
    demo_dataset(tmp_path, **{**SMALL, "n_train": 10, "seed": 3})
    assert len(calls) == 2
    (tmp_path / "images_labels.npz").write_bytes(b"broken")
    rebuilt = demo_dataset(tmp_path, **{**SMALL, "n_train": 10, "seed": 3})
    assert len(calls) == 3 and _same(rebuilt, load_demo_dataset(tmp_path))
    assert demo_dataset(None, **SMALL).split("train")[0].id == "demo-train-000000" and len(calls) == 4


# ------------------------------------------------------------------------------------------------ world 2


@pytest.fixture(scope="module")
def world2() -> dict[str, list[dd.DemoScene]]:
    """World 2 scenes of every split, the unlabeled pool included, without typos or wrong mentions."""
    params = DemoParams(n_train=600, n_val=300, n_test=600, typo_rate=0.0, wrong_mention_rate=0.0, world=2)
    scenes = {name: generate_demo_scenes(params, name) for name in dd.SPLIT_NAMES}
    scenes[dd.POOL] = [make_scene(params, dd.POOL, i) for i in range(600)]
    return scenes


def _families(scenes: list[dd.DemoScene]) -> set[str]:
    return {f for s in scenes for forms in s.forms for f in forms}


def test_world_1_is_unchanged_by_world_2() -> None:
    """Today's world is the default and keeps its bytes (a fingerprint taken before world 2 existed)."""
    ds = make_demo_dataset(n_train=300, n_val=100, n_test=100)
    assert dataset_fingerprint(ds) == "6855c743ecf2b7159d40afa5edbe2f50"
    assert all(s.forms == () for s in generate_demo_scenes(DemoParams(n_train=5), "train"))
    two = make_demo_dataset(n_train=300, n_val=100, n_test=100, world=2)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(ds.split("test"), two.split("test"), strict=True))
    assert [a.captions for a in ds.split("test")] != [b.captions for b in two.split("test")]
    assert dataset_fingerprint(two) == dataset_fingerprint(
        make_demo_dataset(n_train=300, n_val=100, n_test=100, world=2)
    )


def test_surface_forms_partition(world2: dict[str, list[dd.DemoScene]]) -> None:
    """The labeled splits never use a class's held-out family; test and the pool use every family of every class,
    held-out ones included, and a fair share of test mentions are held-out forms."""
    held = {f"{c}:{fam}" for c, fam in dd.held_out_forms().items()}
    every = {f"{c}:{f.family}" for c, forms in enumerate(dd.SURFACE_FORMS) for f in forms}
    for name in ("train", "val"):
        used = _families(world2[name])
        assert not used & held and len(used) > 0.9 * len(every - held), name
    for name in ("test", dd.POOL):
        assert _families(world2[name]) == every, name
    test_mentions = [f for s in world2["test"] for forms in s.forms for f in forms]
    assert 0.15 < np.mean([f in held for f in test_mentions]) < 0.35  # one family in four


def test_world_2_captions_say_what_they_mention(world2: dict[str, list[dd.DemoScene]]) -> None:
    """Every mention's family shows in its caption (a word of that family's phrases), and the vocabulary covers
    every typo-free world-2 caption."""
    for scenes in world2.values():
        for s in scenes[:200]:
            for caption, mentioned, forms in zip(s.captions, s.mentions, s.forms, strict=True):
                tokens = set(tokenize_caption(caption))
                assert tokens <= set(VOCAB), caption
                assert sorted(int(f.split(":")[0]) for f in forms) == sorted(mentioned)
                for f in forms:
                    cls, family = f.split(":")
                    form = next(x for x in dd.SURFACE_FORMS[int(cls)] if x.family == family)
                    words = {t for p in (*form.singular, *form.plural) for t in tokenize_caption(p)} - {"a", "the"}
                    assert tokens & words, (caption, f)


def test_pool_is_deterministic_and_independent_of_workers() -> None:
    images, captions = dd.make_pool(30, chunk=7)
    again, captions2 = dd.make_pool(30, workers=2, chunk=11)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 30
    assert np.array_equal(images, again) and captions == captions2
    scene = make_scene(DemoParams(world=2), dd.POOL, 29)
    assert np.array_equal(images[29], scene.image) and captions[29] == scene.captions
    other, _ = dd.make_pool(30, seed=1)
    assert not np.array_equal(images, other)


def test_pool_is_disjoint_from_the_labeled_splits(world2: dict[str, list[dd.DemoScene]]) -> None:
    """The pool's glyphs come from the train range only: no val or test digit is ever pretrained on; and no pool
    image is a labeled image."""
    pools = {name: set(dd.glyph_pool(name)) for name in dd._RNG_SPLITS}
    assert pools[dd.POOL] == pools["train"] and not pools[dd.POOL] & (pools["val"] | pools["test"])
    used = {o.glyph for s in world2[dd.POOL] for o in s.objects if o.glyph >= 0}
    assert used and used <= pools[dd.POOL]
    labeled = {s.image.tobytes() for name in dd.SPLIT_NAMES for s in world2[name]}
    assert not labeled & {s.image.tobytes() for s in world2[dd.POOL]}


def test_world_is_checked() -> None:
    with pytest.raises(ValueError, match="world"):
        DemoParams(world=3)
