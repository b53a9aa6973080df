"""Window planning for models exported with --any-size (serving/inpaint.py), as pure functions:
a plain Python callable stands in for the model, so what each window was sent as is seen
directly. The served path is in test_any_size_served.py."""

from __future__ import annotations

import numpy as np
import pytest

from ganforge.errors import UsageError
from ganforge.serving.inpaint import AnySize, any_size_spec, inpaint_image, plan_any_size


class Inverter:
    """A stand-in model: answers 255 - image, and records the shape of every call."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert image.shape[:3] == mask.shape[:3] and mask.shape[3] == 1
        assert set(np.unique(mask)) <= {0, 255}
        self.calls.append(image.shape)
        return 255 - image


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_300x200_hole_in_a_1000x700_photo_is_sent_at_native_size_padded_to_the_stride():
    spec = AnySize(stride=64, min_side=64)
    image = _photo(700, 1000)
    mask = np.zeros((700, 1000), np.uint8)
    mask[248:448, 344:644] = 255                        # 300 wide, 200 high
    [piece] = plan_any_size(mask, spec)
    # twice the hole's extent on the 8-pixel grid (304 wide), no resize
    assert piece.native and (piece.h, piece.w) == (608, 608)
    assert piece.shape == (640, 640)                    # padded up to the stride
    model = Inverter()
    out = inpaint_image(image, mask, spec, model, max_batch=4)
    assert model.calls == [(1, 640, 640, 3)]
    hole = mask > 0
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~hole], image[~hole])               # byte for byte outside the hole
    # the model's answer pixel for pixel: a resized window would have blurred it
    assert np.array_equal(out[hole], 255 - image[hole])


def test_windows_of_one_padded_shape_share_a_call_and_other_shapes_get_their_own():
    spec = AnySize(stride=16, min_side=32)
    image = _photo(400, 600, 1)
    mask = np.zeros((400, 600), np.uint8)
    mask[16:24, 16:24] = 255          # two small holes far apart: windows of min_side
    mask[16:24, 560:568] = 255
    mask[200:300, 200:330] = 255      # a large one: a window of its own shape
    pieces = plan_any_size(mask, spec)
    assert sorted(p.shape for p in pieces) == [(32, 32), (32, 32), (272, 272)]
    model = Inverter()
    out = inpaint_image(image, mask, spec, model, max_batch=8)
    assert sorted(model.calls) == [(1, 272, 272, 3), (2, 32, 32, 3)]
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole]) and np.array_equal(out[hole], 255 - image[hole])
    batched = Inverter()
    inpaint_image(image, mask, spec, batched, max_batch=1)        # max_batch splits a group
    assert sorted(batched.calls) == [(1, 32, 32, 3), (1, 32, 32, 3), (1, 272, 272, 3)]


def test_a_window_taller_than_a_wide_photo_is_cropped_to_the_photo_not_squared():
    spec = AnySize(stride=8, min_side=32)
    image = _photo(220, 300, 2)
    mask = np.zeros((220, 300), np.uint8)
    mask[100:140, 80:210] = 255       # 136 wide on the grid: a 272-pixel window, the photo is 220 high
    [piece] = plan_any_size(mask, spec)
    assert piece.native and (piece.y, piece.h, piece.w) == (0, 220, 272) and piece.shape == (224, 272)
    model = Inverter()
    out = inpaint_image(image, mask, spec, model, max_batch=2)
    assert model.calls == [(1, 224, 272, 3)]
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole]) and np.array_equal(out[hole], 255 - image[hole])


def test_a_photo_smaller_than_min_side_is_padded_up_to_it():
    spec = AnySize(stride=8, min_side=64)
    image = _photo(20, 50, 3)
    mask = np.zeros((20, 50), np.uint8)
    mask[5:12, 10:30] = 255
    model = Inverter()
    out = inpaint_image(image, mask, spec, model, max_batch=2)
    assert model.calls == [(1, 64, 64, 3)]
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole]) and np.array_equal(out[hole], 255 - image[hole])


def test_a_window_longer_than_max_side_is_resized_down_to_it_and_a_thin_stroke_survives():
    spec = AnySize(stride=16, min_side=32, max_side=200)
    image = np.full((500, 700, 3), 100, np.uint8)
    mask = np.zeros((500, 700), np.uint8)
    mask[200:300, 250:450] = 255      # a 400-pixel window, twice the cap
    mask[320, 300:400] = 255          # one pixel high, inside the window: must reach the model
    seen = []

    def model(x, m):
        seen.append(m)
        return np.full_like(x, 7)
    [piece] = plan_any_size(mask, spec)
    assert not piece.native and max(piece.scaled) == 192 and piece.shape == (192, 192)
    out = inpaint_image(image, mask, spec, model, max_batch=2)
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole])
    assert np.abs(out[hole].astype(int) - 7).max() <= 1           # the answer, resized back up
    row = (320 - piece.y) * 192 // piece.h
    assert seen[0][0, row - 1:row + 2, :, 0].max() == 255         # the one-pixel line, at 192/416


def test_any_size_spec_reads_the_config_and_refuses_a_cap_below_min_side():
    cfg = {"input": [{"name": "image", "dims": ["-1", "-1", "3"]}, {"name": "mask", "dims": ["-1", "-1", "1"]}],
           "parameters": {"stride": {"string_value": "8"}, "min_side": {"string_value": "32"}}}
    assert any_size_spec(cfg, "ce") == AnySize(8, 32, 1024)
    assert any_size_spec(cfg, "ce", 300) == AnySize(8, 32, 300)
    fixed = {"input": [{"name": "image", "dims": ["64", "64", "3"]}]}
    assert any_size_spec(fixed, "tiles") is None
    with pytest.raises(UsageError) as exc:
        any_size_spec(cfg, "ce", 16, flag="--max-side")
    assert str(exc.value) == ("--max-side: 16 is not allowed; must be an integer in [32, 4096] "
                              "(32: the min_side of model 'ce')")
    with pytest.raises(UsageError, match="lacks the integer parameters 'stride' >= 1 and 'min_side' >= stride"):
        any_size_spec({**cfg, "parameters": {}}, "ce")


def test_the_cli_default_of_max_side_is_the_clients():
    from ganforge import cli_serve
    from ganforge.serving import inpaint

    assert cli_serve.MAX_SIDE == inpaint.MAX_SIDE
    assert cli_serve.DEFAULT_INPAINTER == inpaint.DEFAULT_MODEL


def test_batch_inpaint_takes_the_only_inpainter_or_the_default_among_several():
    from ganforge.serving.inpaint import DEFAULT_MODEL
    from ganforge.serving.jobs.engines import choose_inpainter

    assert choose_inpainter(["inpainter_shapes"], "host:8001") == "inpainter_shapes"
    assert choose_inpainter(["inpainter_photos", DEFAULT_MODEL, "inpainter_shapes"], "host:8001") == DEFAULT_MODEL
    with pytest.raises(UsageError) as exc:
        choose_inpainter(["inpainter_shapes", "inpainter_photos"], "host:8001")
    assert str(exc.value) == ("--model: several inpainting models (inputs image and mask) are served at "
                              "host:8001 (inpainter_photos, inpainter_shapes); choose one")
    with pytest.raises(UsageError, match="--model: no inpainting models"):
        choose_inpainter([], "host:8001")
