"""Per-block figures and the first-jump rule of `edgevit inspect`."""
from __future__ import annotations

import numpy as np

from edgevit.verify import block_figures, first_jump


def test_block_figures_measure_error_power_and_refuse_other_shapes():
    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    noisy = reference + 0.01 * np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    figures = block_figures(reference, noisy)
    assert 35 < figures["sqnr_db"] < 45 and figures["cosine"] > 0.999 and figures["max_rel_error"] < 0.02
    assert block_figures(reference, reference)["sqnr_db"] == float("inf")
    assert block_figures(reference, reference[:, :5]) is None
    overflowed = noisy.copy()
    overflowed[0, 0] = np.inf
    assert block_figures(reference, overflowed)["sqnr_db"] == float("-inf")
    assert first_jump([40.0, block_figures(reference, overflowed)["sqnr_db"]]) == 1


def test_the_first_jump_is_a_fall_of_ten_db_entering_int8_is_not():
    assert first_jump([120.0, 37.0, 33.0, 30.0, 28.0]) is None  # float, then ordinary int8 noise
    assert first_jump([135.0, 28.8, 27.7, 21.1, 21.4]) is None  # EdgeViT-XXS int8: 28.8 dB is int8's floor
    assert first_jump([120.0, 37.0, 30.0, 4.0, 3.0]) == 3  # a block whose activations int8 cannot hold
    assert first_jump([None, 19.0, None, 8.0]) == 1  # below 20 dB at once; blocks without figures skipped
    assert first_jump([None, 25.0, None, 12.0]) == 3
