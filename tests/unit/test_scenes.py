"""The scene generator the shipped model was trained on and is evaluated with."""

from __future__ import annotations

import numpy as np

from samserve_build import scenes


def test_scenes_are_a_pure_function_of_the_seed_and_not_square() -> None:
    first, again = scenes.generate_scene(7), scenes.generate_scene(7)
    assert np.array_equal(first.image, again.image)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first.instances, again.instances, strict=True))
    shapes = {scenes.generate_scene(seed).image.shape[:2] for seed in range(20)}
    assert any(h != w for h, w in shapes) and any(h > w for h, w in shapes) and any(h < w for h, w in shapes)


def test_instances_are_visible_regions_and_wholes_contain_their_parts() -> None:
    nested = 0
    kinds = set()
    for seed in range(60):
        scene = scenes.generate_scene(seed)
        union = np.zeros(scene.image.shape[:2], int)
        for instance in scene.instances:
            kinds.add(instance.shape)
            assert instance.area >= scenes.MIN_VISIBLE_AREA
            assert not (instance.mask & ~instance.whole).any()
            union += instance.mask
            if instance.parent is not None:
                nested += 1
                parent = scene.instances[instance.parent]
                assert not (instance.whole & ~parent.whole).any()
                assert not (instance.mask & parent.mask).any()
        assert union.max() <= 1, "visible regions overlap"
    assert kinds == set(scenes.SHAPES)
    assert nested >= 5


def test_farthest_interior_point_and_tight_box() -> None:
    mask = np.zeros((40, 60), bool)
    mask[10:31, 5:26] = True                 # a 21 x 21 square centred at (15, 20)
    assert scenes.farthest_interior_point(mask) == (15.0, 20.0)
    assert scenes.tight_box(mask) == (5.0, 10.0, 25.0, 30.0)
