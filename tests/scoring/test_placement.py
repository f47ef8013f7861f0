"""kaggle_utils.scoring.placement: the weights' size from the checkpoint's headers, and one copy per GPU vs a split."""

from __future__ import annotations

import pytest

from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.scoring.placement import NF4_BYTES_PER_WEIGHT, GiB, choose_placement, weights_bytes


@pytest.mark.parametrize("name", ["qwen_path", "gemma_path"])
def test_weights_bytes_match_the_loaded_model(name, request) -> None:
    """Read off the safetensors headers, no tensor loaded: the nf4 and fp32 footprints of the real loads."""
    path = request.getfixturevalue(name)
    for four_bit, dtype, size in ((True, "fp16", 2), (False, "fp32", 4)):
        model = load_classifier(ModelConfig(model_path=path, load_in_4bit=four_bit, dtype=dtype), 0)
        assert weights_bytes(path, four_bit, size) == pytest.approx(model.get_memory_footprint(), rel=0.01)


def test_nf4_bytes_per_weight() -> None:
    # half a byte, plus the absmax per 64 weights in 8 bits and its fp32 scale per 256 blocks (double quantisation)
    assert NF4_BYTES_PER_WEIGHT == pytest.approx(0.5 + 0.015625 + 0.000244, abs=1e-6)


T4 = int(15 * GiB)


def test_a_model_that_fits_a_card_gets_a_copy_on_each() -> None:
    place = choose_placement(int(7.8 * GiB), ["cuda:0", "cuda:1"], {"cuda:0": T4, "cuda:1": T4}, 2 * GiB)
    assert place.kind == "per-device" and place.workers == ["cuda:0", "cuda:1"]
    assert "7.8 GiB of weights" in place.reason and "one copy per device (2)" in place.reason


def test_a_model_too_big_for_one_card_is_split_across_both() -> None:
    """A merged fp16 Qwen2.5-14B (26.3 GiB measured on the H200) on two T4s."""
    place = choose_placement(int(26.3 * GiB), ["cuda:0", "cuda:1"], {"cuda:0": T4, "cuda:1": T4}, 1 * GiB)
    assert place.kind == "split" and place.workers == ["cuda:0+cuda:1"]
    assert "do not fit one 15.0 GiB device" in place.reason and "layers split" in place.reason


def test_a_model_that_fits_nowhere_is_refused_with_the_fix() -> None:
    place = choose_placement(int(40 * GiB), ["cuda:0", "cuda:1"], {"cuda:0": T4, "cuda:1": T4}, 2 * GiB)
    assert place.kind == "none" and place.workers == [] and "load_in_4bit" in place.reason
    one = choose_placement(int(20 * GiB), ["cuda:0"], {"cuda:0": T4}, 2 * GiB)
    assert one.kind == "none", "one GPU cannot be split across"


def test_cpu_devices_always_take_a_copy() -> None:
    place = choose_placement(int(100 * GiB), ["cpu", "cpu"], {"cpu": None}, 2 * GiB)
    assert place.kind == "per-device" and place.workers == ["cpu", "cpu"] and "no GPU memory limit" in place.reason
