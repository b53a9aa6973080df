"""The quality metrics: the Fréchet distance and its shapes classifier; mode counting on
stacked digits (the counter, the KL, and the digit classifier)."""

import math

import numpy as np
import pytest
import torch

from ganforge.training import datasets, metrics
from ganforge.training.gan import DCGANConfig, Generator
from ganforge.training.gan_task import to_tensor


def test_frechet_distance_of_gaussian_features_matches_the_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2
    rng = np.random.default_rng(0)
    d, n = 16, 200_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sd1, sd2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    f1 = mu1 + sd1 * rng.standard_normal((n, d))
    f2 = mu2 + sd2 * rng.standard_normal((n, d))
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert metrics.frechet_distance(f1, f2) == pytest.approx(expected, rel=0.02)
    assert metrics.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_with_correlated_features_matches_the_matrix_square_root():
    # full covariances: Tr((S1 S2)^(1/2)) through an independent route, the eigenvalues of S1 S2
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    f1 = rng.standard_normal((5000, 6)) @ a
    f2 = rng.standard_normal((5000, 6)) @ b + 1.0
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_shapes_classifier_tells_the_outlines_and_colours_of_held_out_shapes(shapes_cache):
    model, acc = metrics.load_classifier(shapes_cache)
    assert acc["colour"] >= 0.99 and acc["outline"] >= 0.95
    # square and diamond differ only by size under rotation: the 4-class head sits near the
    # ceiling that leaves, well above chance (0.25)
    assert 0.6 <= acc["shape"] <= acc["outline"]
    # the cached file gives back the accuracy it was trained to: measure it again here
    settings = metrics.ClassifierSettings()
    test = datasets.shapes(settings.n_test, settings.size, seed=settings.seed + 1)
    with torch.no_grad():
        _, shape, colour = model(to_tensor(test.images))
    assert (colour.argmax(1).numpy() == test.colour).mean() == pytest.approx(acc["colour"])
    assert (shape.argmax(1).numpy() == test.shape).mean() == pytest.approx(acc["shape"])


def test_fd_sees_a_missing_shape_and_a_single_shape(shapes_cache):
    """Real images whose shapes are distributed wrongly are far from the held-out set; two real
    sets are close. The 4-epoch classifier that came before scored all-circles at 26."""
    model, _ = metrics.load_classifier(shapes_cache)
    held = metrics.features(model, datasets.shapes(600, 64, seed=10_000).images)
    real = datasets.shapes(600, 64, seed=7).images
    pool = datasets.shapes(2500, 64, seed=8)
    circles = pool.images[pool.shape == datasets.SHAPES.index("circle")][:600]
    no_triangles = pool.images[pool.shape != datasets.SHAPES.index("triangle")][:600]
    fd = {name: metrics.frechet_distance(metrics.features(model, x), held)
          for name, x in (("real", real), ("circles", circles), ("no_triangles", no_triangles))}
    assert fd["real"] < 10
    assert fd["no_triangles"] > 8 * fd["real"], fd
    assert fd["circles"] > 50 * fd["real"], fd


def test_a_small_side_gets_a_classifier_of_its_own_that_ranks_grey_tiles_far_from_the_shapes(shapes_cache):
    """16 px images, repeated up to 32 px, lie outside the 64 px classifier's domain: it is
    refused with the side to load. The 16 px classifier puts real shapes close, one shape far,
    and flat grey tiles (what a G that learned nothing draws) far behind slightly noisy shapes
    (what a G that learned draws). Forced onto 16 px images, the 64 px classifier put the grey
    tiles only 1.33x farther than the noisy shapes (1,753 against 1,323)."""
    big, _ = metrics.load_classifier(shapes_cache)
    with pytest.raises(ValueError, match=r"image side 16 .* trained at 64 px \(allowed: >= 32\); load `settings_for\(16\)`"):
        metrics.features(big, datasets.shapes(8, 16, seed=0).images)
    assert metrics.settings_for(128) == metrics.settings_for(32) == metrics.ClassifierSettings()
    small, acc = metrics.load_classifier(shapes_cache, metrics.settings_for(16))
    assert small.size == 16 and acc["colour"] >= 0.99 and acc["outline"] >= 0.8
    held = metrics.features(small, datasets.shapes(600, 16, seed=10_000).images)
    real = datasets.shapes(600, 16, seed=7).images
    noisy = np.clip(real + np.random.default_rng(0).normal(0, 20, real.shape), 0, 255).astype(np.uint8)
    pool = datasets.shapes(2500, 16, seed=8)
    fd = {name: metrics.frechet_distance(metrics.features(small, x), held)
          for name, x in (("real", real), ("noisy", noisy), ("grey", np.full_like(real, 128)),
                          ("circles", pool.images[pool.shape == datasets.SHAPES.index("circle")][:600]))}
    assert fd["real"] < 10, fd
    assert fd["circles"] > 20 * fd["real"], fd
    assert fd["grey"] > 3 * fd["noisy"], fd


def test_a_classifier_has_the_same_weights_whatever_the_callers_thread_count(tmp_path):
    """Trained by hand, one and two threads give different weights (the float sums of a step
    differ); through the cache, training runs on one thread and the caller's count is restored."""
    s = metrics.ClassifierSettings(n_train=640, n_test=64, epochs=2, size=16)
    before = torch.get_num_threads()
    weights = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weights[f"by hand {threads}"] = metrics.train_classifier(s)[0].state_dict()
            weights[f"cached {threads}"] = metrics.load_classifier(tmp_path / str(threads), s)[0].state_dict()
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
    assert not same("by hand 1", "by hand 2")
    assert same("cached 1", "cached 2") and same("cached 1", "by hand 1")


def test_every_mode_equally_often_is_all_1000_modes_and_kl_zero():
    c = metrics.mode_coverage(np.repeat(np.arange(1000), 26))
    assert c["modes"] == 1000
    assert c["kl"] == pytest.approx(0.0, abs=1e-12)


def test_a_single_mode_is_one_mode_and_kl_log_1000():
    c = metrics.mode_coverage(np.full(26_000, 417))
    assert c == {"modes": 1, "kl": pytest.approx(math.log(1000))}


def test_two_modes_half_each_give_kl_log_500():
    c = metrics.mode_coverage(np.array([3, 999] * 50))
    assert c["modes"] == 2 and c["kl"] == pytest.approx(math.log(500))


def test_mode_indices_outside_1000_are_refused():
    with pytest.raises(ValueError, match="0..999"):
        metrics.mode_coverage(np.array([1000]))


def test_digit_classifier_reaches_95_percent_on_held_out_digits(digit_cache):
    model, acc = metrics.load_digit_classifier(digit_cache)
    assert (acc["n_test"], acc["n_train"]) == (360, 1437)
    assert acc["digit"] >= 0.95
    # the cached file gives back the accuracy it was trained to: measure it again here
    x, y = datasets.digits("test")
    pred = metrics.predict_digits(model, torch.from_numpy(x).float().div(127.5).sub(1.0)[:, None])
    assert (pred == y).mean() == pytest.approx(acc["digit"])


def test_the_classifier_reads_the_triples_of_held_out_stacked_digits(digit_cache):
    model, acc = metrics.load_digit_classifier(digit_cache)
    data = datasets.stacked_digits(600, 16, seed=5, split="test")
    labels = metrics.classify_stacked(model, data.images)
    assert (labels == data.labels).all(1).mean() >= acc["digit"] ** 3 - 0.03
    assert metrics.mode_coverage(datasets.mode_index(labels))["modes"] > 400


def test_counting_a_generator_draws_exactly_n_seeded_samples(digit_cache):
    model, _ = metrics.load_digit_classifier(digit_cache)
    torch.manual_seed(0)
    G = Generator(DCGANConfig(z_dim=8, ngf=4, ndf=4, resolution=16)).eval()
    a = metrics.stacked_mode_coverage(G, model, 250, seed=1, batch=100)
    b = metrics.stacked_mode_coverage(G, model, 250, seed=1, batch=250)
    assert a["sample_modes"].shape == (250,)
    assert np.array_equal(a["sample_modes"], b["sample_modes"])
    assert a["modes"] == len(np.unique(a["sample_modes"]))
