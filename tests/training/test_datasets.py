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
    with pytest.raises(DataError, match="neither 'shapes', 'stacked_digits', 'photos' nor an existing folder"):
        datasets.load_images("no-such-thing", 1)


def test_skimage_photo_crops_need_no_download():
    crops = datasets.load_images("photos", 6, 48, seed=0)
    assert crops.shape == (6, 48, 48, 3)
    assert crops.std() > 10  # real photo content, not a constant


def test_stacked_digits_are_reproducible_from_the_seed():
    a, b = datasets.stacked_digits(50, 16, seed=3), datasets.stacked_digits(50, 16, seed=3)
    assert a.images.shape == (50, 16, 16, 3) and a.images.dtype == np.uint8
    assert a.labels.shape == (50, 3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, datasets.stacked_digits(50, 16, seed=4).images)
    assert np.array_equal(a.modes, 100 * a.labels[:, 0] + 10 * a.labels[:, 1] + a.labels[:, 2])


def test_each_stacked_channel_is_a_split_digit_of_its_label():
    pool, pool_labels = datasets.digits("train")
    data = datasets.stacked_digits(40, 32, seed=0)
    for img, labels in zip(data.images, data.labels):
        for c in range(3):
            # 32 px: every 8x8 pixel replicated 4x4, so one pixel per block gives the digit back
            digit = img[::4, ::4, c]
            assert np.array_equal(img[:, :, c], np.repeat(np.repeat(digit, 4, 0), 4, 1))
            same = np.all(pool == digit, axis=(1, 2))
            assert same.any() and set(pool_labels[same]) == {labels[c]}


def test_the_digit_split_is_fixed_disjoint_and_stratified():
    train, train_y = datasets.digits("train")
    test, test_y = datasets.digits("test")
    assert (len(train), len(test)) == (1437, 360)
    share = np.bincount(test_y) / (np.bincount(test_y) + np.bincount(train_y))
    assert np.all(np.abs(share - 0.2) < 0.01)           # every digit split 80/20
    flat = {t.tobytes() for t in train}
    assert sum(t.tobytes() in flat for t in test) < 5   # a few digits are drawn identically
    assert np.array_equal(datasets.digits("test")[0], test)


def test_stacked_digits_refuse_sizes_that_are_not_multiples_of_8():
    with pytest.raises(DataError, match="size 12 is not allowed; must be a multiple of 8"):
        datasets.stacked_digits(2, 12)
    with pytest.raises(DataError, match="split 'val' is not one of train, test"):
        datasets.digits("val")
    assert datasets.load_images("stacked_digits", 3, 16, 0).shape == (3, 16, 16, 3)


def test_the_dcgan_trainer_never_mirrors_digits():
    from ganforge.training import data

    digits = data.gan_images("stacked_digits", 64, 16, 0)
    shapes = data.gan_images("shapes", 64, 16, 0)
    # every epoch, every item: a digit comes as it is; a shape is mirrored about half the time
    assert all(np.array_equal(digits[(i, e)][0], digits.images[i]) for i in range(64) for e in range(3))
    mirrored = sum(not np.array_equal(shapes[(i, e)][0], shapes.images[i]) for i in range(64) for e in range(3))
    assert 40 < mirrored < 152
