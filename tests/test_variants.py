"""The variant table and the small-input rule (pure Python, no Keras)."""

import pytest

from convnext_zoo.variants import (
    MIN_FEATURE_SIZE,
    STANDARD_STRIDES,
    feature_sizes,
    plan_strides,
    variant_config,
)


@pytest.mark.parametrize("side", range(128, 1025, 7))
def test_rule_never_triggers_at_128_px_and_above(side):
    assert plan_strides(side, side) == STANDARD_STRIDES
    assert plan_strides(side, side + 100) == STANDARD_STRIDES


@pytest.mark.parametrize("side", range(32, 128))
def test_rule_keeps_the_last_map_at_least_minimum(side):
    strides = plan_strides(side, side)
    assert feature_sizes(side, strides)[-1] >= MIN_FEATURE_SIZE
    # Standard strides would have left it too small below 128 px.
    assert feature_sizes(side, STANDARD_STRIDES)[-1] < MIN_FEATURE_SIZE
    assert strides != STANDARD_STRIDES


def test_rule_lowers_deepest_strides_first():
    assert plan_strides(32, 32) == (4, 2, 1, 1)
    assert plan_strides(96, 96) == (4, 2, 2, 1)
    assert feature_sizes(32, plan_strides(32, 32)) == [8, 4, 4, 4]
    assert feature_sizes(48, plan_strides(48, 48)) == [12, 6, 6, 6]
    assert feature_sizes(96, plan_strides(96, 96)) == [24, 12, 6, 6]


def test_rule_uses_the_smaller_side_and_can_be_switched_off():
    assert plan_strides(64, 300) == plan_strides(64, 64)
    assert plan_strides(32, 32, adapt_small_inputs=False) == STANDARD_STRIDES
    assert plan_strides(None, None) == STANDARD_STRIDES


def test_reference_sizes_floor_divide():
    assert feature_sizes(224, STANDARD_STRIDES) == [56, 28, 14, 7]
    assert feature_sizes(200, STANDARD_STRIDES) == [50, 25, 12, 6]
    assert feature_sizes(264, STANDARD_STRIDES) == [66, 33, 16, 8]


def test_unknown_variant_suggests_the_closest():
    with pytest.raises(ValueError, match=r"variant='tinyy'.*Did you mean 'tiny'.*Valid: tiny, small"):
        variant_config("v1", "tinyy")
    with pytest.raises(ValueError, match=r"Did you mean 'atto'"):
        variant_config("v2", "ato")
    with pytest.raises(ValueError, match=r"family='v3'.*Valid: v1, v2"):
        variant_config("v3", "tiny")


@pytest.mark.parametrize("stem", ["overlap", "overlap_tiered", "overlap_act"])
def test_overlapping_stems_round_up_and_lower_only_what_they_need(stem):
    # Two padded 3x3 convs at strides 2 and 2 give ceil(side / 4), not side // 4.
    assert feature_sizes(127, STANDARD_STRIDES, stem) == [32, 16, 8, 4]
    assert feature_sizes(127, STANDARD_STRIDES) == [31, 15, 7, 3]
    for side in range(16, 200):
        strides = plan_strides(side, side, stem=stem)
        assert feature_sizes(side, strides, stem)[-1] >= MIN_FEATURE_SIZE
        # Lowering stops as soon as the map is large enough: standard strides
        # whenever they suffice (125 px and up), else one lowering less fails.
        if feature_sizes(side, STANDARD_STRIDES, stem)[-1] >= MIN_FEATURE_SIZE:
            assert strides == STANDARD_STRIDES, side
        else:
            assert side < 125 and strides != STANDARD_STRIDES
    assert plan_strides(32, 32, stem=stem) == (4, 2, 1, 1)


def test_feature_sizes_refuses_an_unknown_stem():
    with pytest.raises(ValueError, match=r"stem='overlapp'.*Did you mean 'overlap'"):
        feature_sizes(64, STANDARD_STRIDES, "overlapp")
