"""The FLOP floors the NSL overhead benchmarks divide by, against hand counts."""

from __future__ import annotations

from benchmarks.nsl_overhead import layer_multiply_adds
from fewshot_nsl.backbones.similarity import Similarity

P, C, O, H = 100, 64, 64, 16  # positions, input and output channels, meta-network width
CONV = P * O * C * 9


def test_plain_and_static_layers_cost_their_convolution_passes() -> None:
    for kind in ("conv", "static"):
        assert layer_multiply_adds(Similarity(kind), C, O, P) == (CONV, 0)
        assert layer_multiply_adds(Similarity(kind), C, O, P, training=True) == (3 * CONV, 0)
        assert layer_multiply_adds(Similarity(kind), C, O, P, training=True, input_grad=False) == (2 * CONV, 0)


def test_dynamic_similarity_gradient_is_elementwise_given_the_input_gradients_contraction() -> None:
    meta_first, meta_second = P * H * C * 9, P * 9 * H * 9
    diagonal = Similarity("dynamic", "diagonal", H)
    assert layer_multiply_adds(diagonal, C, O, P) == (CONV, meta_first + meta_second + P * C * 9)
    # inner layer: forward, weight and input gradients; m ⊙ patches, G·x and G ⊙ m are elementwise
    assert layer_multiply_adds(diagonal, C, O, P, training=True) == (3 * CONV, 3 * meta_first + 3 * meta_second + 3 * P * C * 9)
    # stem: no input gradient, so G (a convolution-sized contraction) is paid for the similarity gradient
    stem = layer_multiply_adds(diagonal, 3, O, P, training=True, input_grad=False)
    stem_conv = P * O * 3 * 9
    assert stem == (2 * stem_conv, 2 * P * H * 3 * 9 + 3 * meta_second + 2 * P * 3 * 9 + stem_conv)
    full = layer_multiply_adds(Similarity("dynamic", "full", H), C, O, P, training=True)
    assert full == (3 * CONV, 3 * meta_first + 3 * P * 81 * H * 9 + 3 * P * C * 81)
