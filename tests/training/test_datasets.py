import numpy as np
import pytest
from PIL import Image

from ganforge.errors import DataError
from ganforge.images import read_image
from ganforge.training import datasets


def test_shapes_are_reproducible_from_the_seed():
    a, b = datasets.shapes(12, 64, seed=3), datasets.shapes(12, 64, seed=3)
    assert a.images.shape == (12, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.shape, b.shape) and np.array_equal(a.colour, b.colour)
    assert not np.array_equal(a.images, datasets.shapes(12, 64, seed=4).images)


def test_shapes_draw_the_labelled_colour_inside_the_shape():
    data = datasets.shapes(40, 64, seed=0)
    palette = np.array(list(datasets.COLOURS.values()))
    for img, colour in zip(data.images, data.colour):
        pixels = img.reshape(-1, 3).astype(int)
        # the labelled colour covers a real share of the image (at least 2%)
        hits = np.all(np.abs(pixels - palette[colour]) <= 1, axis=1).mean()
        assert hits > 0.02
    assert set(data.shape) <= set(range(len(datasets.SHAPES)))


def test_shapes_size_128_is_allowed_and_tiny_sizes_are_not():
    assert datasets.shapes(2, 128).images.shape == (2, 128, 128, 3)
    with pytest.raises(DataError, match="size must be >= 8"):
        datasets.shapes(2, 4)


def test_folder_loader_converts_grey_rgba_palette_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rng.integers(0, 65535, (40, 50), np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "notes.txt").write_text("not an image")
    photos = datasets.folder_photos(tmp_path)
    assert len(photos) == 4
    assert all(p.shape == (40, 50, 3) and p.dtype == np.uint8 for p in photos)
    crops = datasets.load_images(str(tmp_path), 5, 32, seed=1)
    assert crops.shape == (5, 32, 32, 3)


def test_unreadable_image_and_empty_folder_give_clear_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_image(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        datasets.folder_photos(empty)
    with pytest.raises(DataError, match="neither 'shapes', 'photos' nor an existing folder"):
        datasets.load_images("no-such-thing", 1)


def test_skimage_photo_crops_need_no_download():
    crops = datasets.load_images("photos", 6, 48, seed=0)
    assert crops.shape == (6, 48, 48, 3)
    assert crops.std() > 10  # real photo content, not a constant
