"""Shape World concepts: exact targets of any combination, read back by nearest exact render."""

import numpy as np
import pytest

from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, get_concept


def test_concept_pairs_are_exact_and_read_back():
    world = ConceptWorld(32)
    pair = world.pair(["background:red", "tone:sepia"], seed=0, split="eval")
    again = world.pair(["tone:sepia", "background:red"], seed=0, split="eval")
    np.testing.assert_array_equal(pair.target, again.target)  # order-free: families are separate fields
    assert world.attribute_accuracy(pair, pair.target) == {"background:red": True, "tone:sepia": True}
    assert world.attribute_accuracy(pair, pair.source) == {"background:red": False, "tone:sepia": False}
    only_bg = world.render(get_concept("background:red").apply(pair.scene))
    assert world.attribute_accuracy(pair, only_bg) == {"background:red": True, "tone:sepia": False}
    assert pair.masks["background:red"].sum() < pair.mask.size == pair.masks["tone:sepia"].sum()
    with pytest.raises(ValueError, match="one concept per family"):
        world.pair(["tone:sepia", "tone:night"], seed=0)
    with pytest.raises(ValueError, match="unknown tone value"):
        get_concept("tone:blue")
    train = set(get_concept("tone:warm").phrases())
    assert train and not train & set(get_concept("tone:warm").phrases(held_out=True))
