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


def test_the_first_jump_is_a_fall_of_ten_db_entering_int8_is_not():
    assert first_jump([120.0, 37.0, 33.0, 30.0, 28.0]) is None  # float, then ordinary int8 noise
    assert first_jump([120.0, 37.0, 30.0, 4.0, 3.0]) == 3  # a block whose activations int8 cannot hold
    assert first_jump([None, 25.0, None, 12.0]) == 1  # below 30 dB at once; blocks without figures skipped
