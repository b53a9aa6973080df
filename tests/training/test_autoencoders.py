import numpy as np
import pytest
import torch

from ganforge import masks
from ganforge.errors import DataError
from ganforge.training.autoencoders import (PCA, AEConfig, AutoEncoder, Denoiser, DenoiserConfig,
                                            gaussian_noise, masked_mse, random_mask,
                                            reconstruction_error, salt_and_pepper)


def test_pca_reconstruction_error_equals_the_sum_of_discarded_eigenvalues():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    for k in (1, 4, 8, 12):
        pca = PCA.fit(Y, k)
        E = reconstruction_error(Y, pca.reconstruct(Y))
        # E = (P - 1) * sum of the eigenvalues of the sample covariance left out
        assert E == pytest.approx((len(Y) - 1) * pca.eigenvalues[k:].sum(), rel=1e-9, abs=1e-9)
    assert reconstruction_error(Y, PCA.fit(Y, 12).reconstruct(Y)) == pytest.approx(0, abs=1e-12)


def test_autoencoder_maps_patterns_through_a_k_dimensional_code():
    ae = AutoEncoder(AEConfig(input_dim=48, code_dim=5, hidden=16))
    y = torch.randn(7, 48)
    assert ae.G(y).shape == (7, 5) and ae(y).shape == (7, 48)


def test_masked_loss_ignores_the_known_region():
    target = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:4, 2:4] = 1
    pred = torch.randn(2, 3, 8, 8) * 10
    pred_hole_right = pred * (1 - mask)            # hole exactly right, known region wildly wrong
    assert float(masked_mse(pred_hole_right, target, mask)) == 0.0
    pred_hole_wrong = pred_hole_right + mask * 1.0
    assert float(masked_mse(pred_hole_wrong, target, mask)) == pytest.approx(1.0)


def test_masked_loss_reductions_weigh_holes_per_pixel_or_per_image():
    target = torch.zeros(3, 1, 4, 4)
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, :, :2, :2] = 1           # 4 hole pixels, error 1 each
    mask[1, :, 0, 0] = 1             # 1 hole pixel, error 3
    pred = torch.zeros(3, 1, 4, 4)
    pred[0] = 1.0
    pred[1] = 3.0
    pred[2] = 100.0                  # no hole: adds nothing to any reduction
    assert float(masked_mse(pred, target, mask)) == pytest.approx((4 * 1 + 9) / 5)
    assert float(masked_mse(pred, target, mask, "pixels")) == pytest.approx((4 * 1 + 9) / 5)
    assert float(masked_mse(pred, target, mask, "images")) == pytest.approx((1 + 9) / 2)
    assert float(masked_mse(pred, target, mask, "log-images")) == pytest.approx(
        (np.log(1 + 1e-8) + np.log(9 + 1e-8)) / 2, rel=1e-6)
    assert float(masked_mse(pred, target, torch.zeros_like(mask), "images")) == 0.0
    with pytest.raises(ValueError, match=r"reduce 'mean' not allowed; one of pixels, images, log-images"):
        masked_mse(pred, target, mask, "mean")


def test_corruption_processes_are_seeded():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(7)
    assert torch.equal(gaussian_noise(x, 25.0, g()), gaussian_noise(x, 25.0, g()))
    assert torch.equal(gaussian_noise(x, (5.0, 50.0), g()), gaussian_noise(x, (5.0, 50.0), g()))
    assert torch.equal(salt_and_pepper(x, 0.2, g()), salt_and_pepper(x, 0.2, g()))
    assert torch.equal(random_mask(x.shape, 0.5, g(), patch=4), random_mask(x.shape, 0.5, g(), patch=4))
    assert not torch.equal(gaussian_noise(x, 25.0, g()), gaussian_noise(x, 25.0, torch.Generator().manual_seed(8)))
    # sigma on the 0-255 scale: the noise std in [-1, 1] units is 2 * sigma / 255
    big = torch.zeros(1, 3, 256, 256)
    assert float(gaussian_noise(big, 25.0, g()).std()) == pytest.approx(50 / 255, rel=0.02)
    ratio = float(random_mask((8, 1, 64, 64), 0.3, g()).mean())
    assert ratio == pytest.approx(0.3, abs=0.02)


def test_masks_are_seeded_and_cover_what_they_say():
    assert np.array_equal(masks.strokes(64, 64, 3), masks.strokes(64, 64, 3))
    assert not np.array_equal(masks.strokes(64, 64, 3), masks.strokes(64, 64, 4))
    assert (masks.centre(64, 64) > 0).mean() == pytest.approx(0.25)
    for kind in ("centre", "blocks", "strokes"):
        m = masks.make(kind, 48, 64, 1)
        assert m.shape == (48, 64) and set(np.unique(m)) <= {0, 255} and m.any()
    with pytest.raises(DataError, match="mask kind: 'star' is not allowed"):
        masks.make("star", 8, 8)


def test_mask_images_of_any_format_become_binary():
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    assert masks.to_binary(grey).tolist() == [[0, 0, 255, 255]]
    deep = np.array([[0, 40000]], np.uint16)
    assert masks.to_binary(deep).tolist() == [[0, 255]]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, :, :3] = 255
    rgba[0, 1, 3] = 255          # only the opaque white pixel is a hole
    assert masks.to_binary(rgba).tolist() == [[0, 255]]


def test_the_denoiser_is_fully_convolutional_and_learns_the_residual():
    net = Denoiser(DenoiserConfig(width=4, depth=3)).eval()
    for h, w in ((17, 23), (64, 40)):
        x = torch.rand(1, 3, h, w)
        assert net(x).shape == (1, 3, h, w)
    with torch.no_grad():
        x = torch.rand(2, 3, 8, 8)
        assert torch.allclose(net(x), x - net.body(x))


def test_pull_push_and_harmonic_fill_keep_known_pixels_and_fill_flat_and_linear_images():
    from ganforge.training.classical_fills import harmonic_fill, pull_push

    known = torch.ones(2, 1, 32, 32)
    known[:, :, 8:20, 10:26] = 0
    flat = torch.full((2, 3, 32, 32), 0.3)
    for fill in (pull_push(flat * known, known), harmonic_fill(flat * known, known, 16)):
        torch.testing.assert_close(fill, flat)  # a flat image is filled with its value, exactly
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32).contiguous()
    fill = harmonic_fill(ramp * known, known, 400)
    assert torch.equal(fill[known.expand_as(fill) > 0], ramp[known.expand_as(ramp) > 0])
    # a linear ramp is harmonic: the membrane across the hole recovers it
    assert float((fill - ramp).abs().max()) < 0.02
    assert float((pull_push(ramp * known, known) - ramp).abs().max()) > 0.02  # pull-push alone is coarser


def test_prefill_context_encoder_starts_as_the_harmonic_fill_and_learns_a_residual():
    from ganforge.training.classical_fills import harmonic_fill
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig

    net = ContextEncoder(ContextEncoderConfig(width=8, dilations=(2,), prefill=True, diffuse=8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = torch.zeros(2, 1, 32, 32)
    m[:, :, 10:20, 10:20] = 1
    torch.testing.assert_close(net(x * (1 - m), m), harmonic_fill(x * (1 - m), 1 - m, 8).clamp(-1, 1))
    loss = ((net(x * (1 - m), m) - x) ** 2 * m).mean()
    loss.backward()
    assert float(net.decode[-1].weight.grad.abs().sum()) > 0


def test_cascade_fill_recovers_smooth_surfaces_and_keeps_known_pixels():
    """A ramp is harmonic and a quadratic bowl is biharmonic (its bilaplacian is 0): the cascade
    recovers each across a large hole; pull-push + harmonic steps alone misses the bowl."""
    from ganforge.training.classical_fills import cascade_fill, harmonic_fill

    known = torch.ones(1, 1, 64, 64)
    known[:, :, 16:48, 16:48] = 0                       # a centre hole, 25 % of the tile
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    ramp = (0.8 * xx).expand(1, 3, 64, 64).contiguous()
    bowl = (0.9 * (xx ** 2 + yy ** 2) - 0.9).expand(1, 3, 64, 64).contiguous()
    k3 = known.expand(1, 3, 64, 64) > 0
    for surface, harmonic, bilaplace, tol in ((ramp, 40, 0, 1e-5), (bowl, 0, 500, 0.03)):
        fill = cascade_fill(surface * known, known, harmonic, bilaplace)
        assert torch.equal(fill[k3], surface[k3])
        assert float((fill - surface).abs().max()) < tol
    membrane = harmonic_fill(bowl * known, known, 200)
    assert float((membrane - bowl).abs().max()) > 0.1


def test_thin_plate_fill_solves_the_biharmonic_equation_in_the_hole_and_keeps_known_pixels():
    """The conjugate-gradient fill minimises sum (Laplacian u)^2 over the hole: its Laplacian and
    adjoint are exact transposes, a quadratic bowl (bilaplacian 0) is recovered across a 16x16
    hole (256 unknowns per channel) in 60 steps to float32 precision, where the cascade's 60
    explicit biharmonic steps per level are still off, and a tile without a hole comes back as it
    went in."""
    from ganforge.training.classical_fills import (_laplacian, _laplacian_adjoint, cascade_fill, pull_push,
                                                   thin_plate_fill)

    a, b = torch.randn(2, 3, 9, 11, dtype=torch.float64), torch.randn(2, 3, 9, 11, dtype=torch.float64)
    assert abs(float((_laplacian(a) * b).sum() - (a * _laplacian_adjoint(b)).sum())) < 1e-9

    known = torch.ones(1, 1, 64, 64)
    known[:, :, 24:40, 24:40] = 0
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    bowl = (0.9 * (xx ** 2 + yy ** 2) - 0.9).expand(1, 3, 64, 64).contiguous()
    k3 = known.expand(1, 3, 64, 64) > 0
    start = pull_push(bowl * known, known)
    assert float((start - bowl).abs().max()) > 0.1
    fill = thin_plate_fill(bowl * known, known, start, 60)
    assert torch.equal(fill[k3], bowl[k3])
    assert float((fill - bowl).abs().max()) < 1e-4
    explicit = cascade_fill(bowl * known, known, 0, 60)
    assert float((explicit - bowl).abs().max()) > 0.01

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(thin_plate_fill(x, torch.ones(2, 1, 16, 16), x, 10), x)


def test_cascade_context_encoder_exports_to_onnx_with_the_same_fill(tmp_path):
    import onnxruntime as ort

    from ganforge.export.onnx import export_onnx
    from ganforge.training.classical_fills import cascade_fill, thin_plate_fill
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig

    net = ContextEncoder(ContextEncoderConfig(width=8, dilations=(2,), prefill=True, fill="cascade",
                                              diffuse=4, bilaplace=6, thinplate=5)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = torch.zeros(2, 1, 32, 32)
    m[:, :, 8:20, 12:24] = 1
    with torch.no_grad():
        ref = net(x * (1 - m), m)
    torch.testing.assert_close(ref, thin_plate_fill(x * (1 - m), 1 - m, cascade_fill(x * (1 - m), 1 - m, 4, 6),
                                                    5).clamp(-1, 1))
    from ganforge.errors import UsageError

    with pytest.raises(UsageError, match=r"fill 'biharmonic', .* not allowed; fill is one of harmonic, cascade"):
        ContextEncoder(ContextEncoderConfig(prefill=True, fill="biharmonic"))
    path = export_onnx(net, (x * (1 - m), m), ["masked", "mask"], ["out"], tmp_path / "ce.onnx", 4)
    got = ort.InferenceSession(str(path)).run(None, {"masked": (x * (1 - m)).numpy(), "mask": m.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_denoiser_fine_tune_starts_from_its_init_and_the_export_records_the_chain(tmp_path):
    import json

    from ganforge.errors import UsageError
    from ganforge.export.triton import export_run
    from ganforge.training.autoencoders import DenoiserTrainConfig, train_denoiser
    from ganforge.training.gan import load_checkpoint

    net = DenoiserConfig(width=8, depth=3)
    train_denoiser(DenoiserTrainConfig(steps=2, batch_size=4, patch=16, pool=8, threads=1, network=net),
                   tmp_path / "base", progress=False)
    # lr 0: the fine-tuned weights are the init's, so the init was really loaded
    train_denoiser(DenoiserTrainConfig(steps=2, batch_size=4, patch=16, pool=8, threads=1, lr=0.0,
                                       crop_scale=(0.0, 0.1), init=str(tmp_path / "base"), network=net),
                   tmp_path / "ft", progress=False)
    base, ft = load_checkpoint(tmp_path / "base"), load_checkpoint(tmp_path / "ft")
    for k, v in base["state"]["net"].items():
        assert torch.equal(ft["state"]["net"][k], v), k
    export_run(tmp_path / "ft", tmp_path / "repo", name="dn", tile=32, max_batch_size=2, log=lambda m: None)
    manifest = json.loads((tmp_path / "repo/dn/manifest.json").read_text())
    (before,) = manifest["init_commands"]
    assert before.startswith("ganforge train denoiser") and f"--out {tmp_path / 'base'}" in before
    assert f"--init {tmp_path / 'base'}" in manifest["train_command"]
    assert "--crop-scale 0.0 0.1" in manifest["train_command"]
    with pytest.raises(UsageError, match=r"--init: .* holds a denoiser .* give the same --width and --depth"):
        train_denoiser(DenoiserTrainConfig(steps=1, batch_size=4, patch=16, pool=8, threads=1,
                                           init=str(tmp_path / "base"), network=DenoiserConfig(width=4, depth=3)),
                       tmp_path / "bad", progress=False)
    with pytest.raises(UsageError, match=r"--crop-scale: 0.5 0.2 is not allowed; the first must not exceed the second"):
        train_denoiser(DenoiserTrainConfig(steps=1, crop_scale=(0.5, 0.2), network=net), tmp_path / "bad2", progress=False)


def _blend_net(**kw):
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig

    cfg = dict(width=8, prefill=True, fill="cascade", diffuse=4, bilaplace=6, thinplate=5, head="blend",
               blend_thinplate=7)
    return ContextEncoder(ContextEncoderConfig(**{**cfg, **kw})).eval()


def _holed(n=2, size=32, seed=0):
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    m = torch.zeros(n, 1, size, size)
    m[:, :, 8:20, 12:24] = 1
    m[:, :, 26:29, :] = 1          # a thin stroke across the tile
    return x, m


def test_blend_head_answers_a_convex_combination_of_its_three_classical_fills():
    from ganforge.training.classical_fills import cascade_fill, thin_plate_fill
    from ganforge.training.inpaint_nets import BLEND_PRIOR

    net = _blend_net()
    x, m = _holed()
    xm, known = x * (1 - m), 1 - m
    with torch.no_grad():
        fills = net.fills(xm, m)
        cascade = cascade_fill(xm, known, 4, 6)
        early = thin_plate_fill(xm, known, cascade, 5)
        torch.testing.assert_close(fills, torch.stack([early, thin_plate_fill(xm, known, early, 7), cascade], 1))
        w = net.blend.weights(fills, m)
        out = net(xm, m)
    # untrained: the prior's weights, the thin plate's the largest
    prior = np.exp(BLEND_PRIOR) / (np.exp(BLEND_PRIOR) + 2)
    torch.testing.assert_close(w[:, 0], torch.full_like(w[:, 0], float(prior)))
    # every pixel lies between the fills' smallest and largest value; known pixels are the input's
    with torch.no_grad():
        net.blend.net[-1].weight.normal_(0, 0.5)   # weights that vary per pixel
        w, out = net.blend.weights(fills, m), net(xm, m)
    assert w.std() > 0.05
    torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))
    assert (out >= fills.min(1).values - 1e-6).all() and (out <= fills.max(1).values + 1e-6).all()
    torch.testing.assert_close(out * known, x * known)


def test_blend_fills_turn_with_the_image_so_training_can_flip_and_rotate_them():
    net = _blend_net()
    x, m = _holed(seed=1)
    with torch.no_grad():
        fills = net.fills(x * (1 - m), m)
        for turn in (lambda t: t.flip(-1), lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(3, (-2, -1))):
            turned = net.fills(turn(x * (1 - m)), turn(m))
            assert (turned - turn(fills)).abs().max() < 1e-4


def test_blend_head_needs_the_thin_plate_and_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    from ganforge.errors import UsageError
    from ganforge.export.onnx import export_onnx
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig

    with pytest.raises(UsageError, match=r"head blend needs --prefill --fill cascade --thinplate N > 0"):
        ContextEncoder(ContextEncoderConfig(prefill=True, fill="cascade", head="blend"))
    with pytest.raises(UsageError, match=r"head 'mixture' not allowed; one of residual, blend"):
        ContextEncoder(ContextEncoderConfig(head="mixture"))
    net = _blend_net()
    with torch.no_grad():
        net.blend.net[-1].weight.normal_(0, 0.5)
    x, m = _holed(seed=2)
    with torch.no_grad():
        ref = net(x * (1 - m), m)
    path = export_onnx(net, (x * (1 - m), m), ["masked", "mask"], ["out"], tmp_path / "blend.onnx", 4)
    got = ort.InferenceSession(str(path)).run(None, {"masked": (x * (1 - m)).numpy(), "mask": m.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_blend_training_computes_the_fills_once_per_pair_and_learns_the_weights(tmp_path, monkeypatch):
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig, InpaintTrainConfig, train_inpainter

    calls = []
    fills = ContextEncoder.fills
    monkeypatch.setattr(ContextEncoder, "fills", lambda self, x, m: calls.append(len(x)) or fills(self, x, m))
    net = ContextEncoderConfig(width=8, prefill=True, fill="cascade", diffuse=2, bilaplace=2, thinplate=3,
                               head="blend", blend_thinplate=3)
    counted = {}
    for steps in (2, 6):
        calls.clear()
        summary = train_inpainter(InpaintTrainConfig(steps=steps, batch_size=4, tile=32, pool=6, threads=1, lr=1e-2,
                                                     doctor_every=100, network=net), tmp_path / f"b{steps}",
                                  progress=False)
        counted[steps] = list(calls)
    # the pool's 6 pairs once, then only the doctor's and the samples' forwards: not one per step
    assert counted[2] == counted[6] and counted[6][0] == 6
    payload = load_checkpoint(tmp_path / "b6")
    assert payload["config"]["head"] == "blend" and payload["train"]["pool"] == 6
    last = payload["state"]["net"]["blend.net.8.weight"]
    assert last.abs().max() > 0          # the zero-initialised layer moved: the weights were trained
    assert np.isfinite(summary["l_rec"])


def test_fill_iterations_export_as_onnx_loops_not_unrolled_copies(tmp_path):
    import onnx
    import onnxruntime as ort

    from ganforge.export.onnx import export_onnx

    x, m = _holed(seed=3)
    sizes = {}
    for name, net in (("few", _blend_net()), ("many", _blend_net(blend_thinplate=300, blend_validate=2))):
        with torch.no_grad():
            net.blend.net[-1].weight.normal_(0, 0.5)
            ref = net(x * (1 - m), m)
        path = export_onnx(net, (x * (1 - m), m), ["masked", "mask"], ["out"], tmp_path / f"{name}.onnx", 4)
        graph = onnx.load(str(path)).graph
        assert any(n.op_type == "Loop" for n in graph.node), name
        got = ort.InferenceSession(str(path)).run(None, {"masked": (x * (1 - m)).numpy(), "mask": m.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() < 1e-4, name
        sizes[name] = sum(p.stat().st_size for p in tmp_path.glob(f"{name}.onnx*"))
    # 300 further thin-plate steps (and the band's second set of fills) cost a few ops, not 300 copies
    assert sizes["many"] < 3 * sizes["few"], sizes


def test_repeat_runs_the_step_n_times_eagerly():
    from ganforge.training.classical_fills import repeat

    state = repeat(5, lambda a, b: (a + 1, b * 2), (torch.zeros(()), torch.ones(2)))
    assert float(state[0]) == 5 and state[1].tolist() == [32.0, 32.0]
    x = torch.ones(3)
    assert repeat(0, lambda a: (a + 1,), (x,))[0] is x


def test_scored_blend_starts_from_the_fills_band_errors_on_this_tile():
    from ganforge.training.inpaint_nets import VALIDATE_TEMPERATURE

    net = _blend_net(blend_validate=2)
    x, m = _holed(seed=4)
    xm = x * (1 - m)
    with torch.no_grad():
        fills, errors = net.fills(xm, m), net.band_errors(xm, m)
        w = net.blend.weights(fills, m, errors)
        # the band: known pixels within 2 px of the hole, filled as if hole, scored against x
        grown = torch.nn.functional.max_pool2d(m, 5, 1, 2)
        band = (grown - m).bool()[:, 0]
        refill = net.fills(x * (1 - grown), grown)
        for b in range(len(x)):
            for k in range(3):
                expect = ((refill[b, k] - x[b]) ** 2)[:, band[b]].mean()
                torch.testing.assert_close(errors[b, k], expect)
    assert errors.shape == (2, 3) and (errors > 0).all()
    # untrained: the weights are the softmax of -T times each error over the tile's mean error
    rel = errors / errors.mean(1, keepdim=True)
    prior = torch.softmax(-VALIDATE_TEMPERATURE * rel, 1)
    torch.testing.assert_close(w, prior[..., None, None].expand_as(w))
    assert int(prior[0].argmax()) == int(errors[0].argmin())
    # the band errors are sums over the tile: a flip or a quarter turn leaves them as they are
    for turn in (lambda t: t.flip(-1), lambda t: t.rot90(1, (-2, -1))):
        with torch.no_grad():
            torch.testing.assert_close(net.band_errors(turn(xm), turn(m)), errors, rtol=1e-3, atol=1e-6)
    # a tile without a hole has no band: every fill scores 0 and the weights are uniform
    with torch.no_grad():
        none = torch.zeros_like(m)
        e0 = net.band_errors(x, none)
        assert (e0 == 0).all()
        torch.testing.assert_close(net.blend.weights(net.fills(x, none), none, e0), torch.full((2, 3, 32, 32), 1 / 3))


def test_scored_blend_usage_errors():
    from ganforge.errors import UsageError
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig

    assert _blend_net().band_errors(*_holed()) is None
    with pytest.raises(UsageError, match=r"--blend-validate 2 needs --head blend \(got head 'residual'\)"):
        ContextEncoder(ContextEncoderConfig(prefill=True, blend_validate=2))
    with pytest.raises(UsageError, match=r"--blend-validate >= 0 .*blend_validate -1"):
        _blend_net(blend_validate=-1)
    net = _blend_net(blend_validate=2)
    x, m = _holed()
    with pytest.raises(ValueError, match=r"FillBlend\(scored=True\) called without band errors"):
        net.blend(net.fills(x, m), m)


def test_scored_blend_training_computes_the_band_errors_once_per_pair(tmp_path, monkeypatch):
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig, InpaintTrainConfig, train_inpainter
    from ganforge.training.options import train_command

    calls = []
    errors = ContextEncoder.band_errors
    monkeypatch.setattr(ContextEncoder, "band_errors", lambda self, x, m: calls.append(len(x)) or errors(self, x, m))
    net = ContextEncoderConfig(width=8, prefill=True, fill="cascade", diffuse=2, bilaplace=2, thinplate=3,
                               head="blend", blend_thinplate=3, blend_validate=2)
    summary = train_inpainter(InpaintTrainConfig(steps=6, batch_size=4, tile=32, pool=6, threads=1, lr=1e-2,
                                                 doctor_every=100, network=net), tmp_path / "s", progress=False)
    # the pool once, then the last step's doctor and sample grid and samples.png: not per step
    assert calls[0] == 6 and len(calls) == 4
    payload = load_checkpoint(tmp_path / "s")
    assert payload["config"]["blend_validate"] == 2
    assert payload["state"]["net"]["blend.net.0.weight"].shape[1] == 3 * 3 + 1 + 3
    assert "--blend-validate 2" in train_command("inpainter", payload["train"], tmp_path / "s")
    assert "--rec-reduce pixels" in train_command("inpainter", payload["train"], tmp_path / "s")
    assert np.isfinite(summary["l_rec"])


def test_inpainter_trains_on_the_per_image_log_loss_and_records_it(tmp_path):
    from ganforge.errors import UsageError
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter
    from ganforge.training.options import train_command

    net = ContextEncoderConfig(width=8, prefill=True, fill="cascade", diffuse=2, bilaplace=2, thinplate=3,
                               head="blend", blend_thinplate=3, blend_validate=2)
    cfg = InpaintTrainConfig(steps=3, batch_size=4, tile=32, pool=6, threads=1, lr=1e-2, doctor_every=100,
                             rec_reduce="log-images", network=net)
    summary = train_inpainter(cfg, tmp_path / "log", progress=False)
    assert summary["l_rec"] < 0          # a log of MSEs under 1 (images in [-1, 1], fills close)
    payload = load_checkpoint(tmp_path / "log")
    assert "--rec-reduce log-images" in train_command("inpainter", payload["train"], tmp_path / "log")
    cfg.rec_reduce = "median"
    with pytest.raises(UsageError, match=r"--rec-reduce: 'median' is not allowed; must be one of pixels, images, "
                                         r"log-images"):
        train_inpainter(cfg, tmp_path / "bad", progress=False)


def test_a_long_thin_plate_solve_stays_finite_in_onnx_runtime(tmp_path):
    """Past convergence, float32 rounding made the conjugate gradient's step sizes noise: on this
    tile (a window of chelsea around a stroke, as the client sends it) ONNX Runtime's iterates
    reached NaN after 200 steps. Converged systems now stop."""
    import onnxruntime as ort
    from skimage import data

    from ganforge.export.onnx import export_onnx
    from ganforge.serving import inpaint as si
    from ganforge.training.classical_fills import cascade_fill, thin_plate_fill

    photo = data.chelsea()
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[240:250, 30:90] = 255
    win = si.plan_windows(mask, 64)[0]
    crop = photo[win.y:win.y + win.size, win.x:win.x + win.size]
    tile = si._resize(crop, 64)
    small = si._resize(si._max_pool_to(mask[win.y:win.y + win.size, win.x:win.x + win.size], 64), 64, nearest=True)
    x = torch.from_numpy(tile[None].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(small[None, None] > 0).float()
    xm = x * (1 - m)
    start = thin_plate_fill(xm, 1 - m, cascade_fill(xm, 1 - m, 20, 100), 50)

    class Solve(torch.nn.Module):
        def forward(self, xm, m, u):
            return thin_plate_fill(xm, 1 - m, u, 350)

    path = export_onnx(Solve(), (xm, m, start), ["xm", "m", "u"], ["out"], tmp_path / "tp.onnx", 4)
    got = ort.InferenceSession(str(path)).run(None, {"xm": xm.numpy(), "m": m.numpy(), "u": start.numpy()})[0]
    with torch.no_grad():
        ref = Solve()(xm, m, start).numpy()
    assert np.isfinite(got).all() and np.isfinite(ref).all()
    assert np.abs(got - ref).max() < 1e-4


def _tiny_blend(**kw):
    from ganforge.training.inpainting import ContextEncoderConfig

    return ContextEncoderConfig(width=8, prefill=True, fill="cascade", diffuse=2, bilaplace=2, thinplate=3,
                                head="blend", blend_thinplate=3, blend_validate=2, **kw)


def test_validation_scores_the_photos_no_split_trains_or_tests_on_and_logs_them(tmp_path):
    import json

    from ganforge.training import datasets
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpainting import ContextEncoder, ContextEncoderConfig, InpaintTrainConfig, Validation, train_inpainter
    from ganforge.training.options import train_command

    photos = datasets.validation_photos()
    assert len(photos) == len(datasets.VALIDATION_PHOTOS) == 4
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 400 for p in photos)
    assert not set(datasets.VALIDATION_PHOTOS) & (set(datasets.TRAIN_PHOTOS) | set(datasets.HELD_OUT_PHOTOS))
    cfg = InpaintTrainConfig(steps=4, batch_size=4, tile=32, pool=6, threads=1, lr=5e-2, doctor_every=100,
                             val_every=2, val_crops=4, network=_tiny_blend())
    summary = train_inpainter(cfg, tmp_path / "v", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_score" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert r["val_score"] == pytest.approx((r["val_centre25"] + r["val_freeform"]) / 2, abs=2e-3)
        assert 5 < r["val_centre25"] < 60 and 5 < r["val_freeform"] < 60
    best = max(val, key=lambda r: r["val_score"])
    payload = load_checkpoint(tmp_path / "v")
    assert summary["selected_step"] == payload["validation"]["step"] == best["step"] and payload["step"] == 4
    # the untrained start is the reference, not a candidate
    G = ContextEncoder(ContextEncoderConfig(**payload["config"]))
    first = Validation(cfg, G)(G)
    assert payload["validation"] == {"step": best["step"], "first": first, "best": best["val_score"]}
    assert summary["val_psnr_untrained"] == first["score"]
    # the saved weights score what was logged for them
    G.load_state_dict(payload["state"]["net"])
    assert Validation(cfg, G)(G)["score"] == best["val_score"]
    assert "--val-every 2" in train_command("inpainter", payload["train"], tmp_path / "v")
    # a residual model is scored through its forward; untrained, that is its prefill
    res = ContextEncoder(ContextEncoderConfig(width=8, prefill=True, diffuse=4))
    v, xs = Validation(cfg, res), []
    for setting, (crops, hole, x, m, pre) in v.sets.items():
        assert pre is None
        with torch.no_grad():
            got = ((res.fill(x * (1 - m), m) + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        xs.append(np.mean([10 * np.log10(255 ** 2 / ((got[i] - crops[i].astype(np.float32)) ** 2)[hole[i]].mean())
                           for i in range(len(crops))]))
    assert v(res)["score"] == pytest.approx(float(np.mean(xs)), abs=2e-3)


def test_validation_keeps_the_best_weights_not_the_last(tmp_path, monkeypatch):
    from ganforge.errors import UsageError
    from ganforge.training import inpainting
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpainting import InpaintTrainConfig, train_inpainter

    scripted, seen = iter([10.0, 12.0, 15.0, 11.0]), []   # the start, then steps 2, 4, 6: step 4 is best

    def score(self, G):
        seen.append({k: v.clone() for k, v in G.state_dict().items()})
        s = next(scripted)
        return {"centre25": s, "freeform": s, "score": s}
    monkeypatch.setattr(inpainting.Validation, "__call__", score)
    cfg = InpaintTrainConfig(steps=6, batch_size=4, tile=32, pool=6, threads=1, lr=5e-2, doctor_every=100,
                             val_every=2, val_crops=2, network=_tiny_blend())
    summary = train_inpainter(cfg, tmp_path / "b", progress=False)
    payload = load_checkpoint(tmp_path / "b")
    assert summary["selected_step"] == payload["validation"]["step"] == 4 and summary["val_psnr_untrained"] == 10.0
    saved, at4, last = payload["state"]["net"], seen[2], seen[3]
    assert all(torch.equal(saved[k], at4[k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)   # training moved on after step 4
    cfg.val_every = -1
    with pytest.raises(UsageError, match=r"--val-every: -1 is not allowed; must be >= 0"):
        train_inpainter(cfg, tmp_path / "bad", progress=False)


def test_balanced_draw_gives_every_fill_an_equal_share_of_wins(tmp_path):
    from ganforge.errors import UsageError
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.inpaint_data import balanced_draw, fill_winners
    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter
    from ganforge.training.options import train_command

    # three candidate fills of two crops: the winner is the one closest to the crop inside the hole
    crops = np.full((2, 8, 8, 3), 128, np.uint8)
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 255
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    fills = x[:, None].repeat(1, 3, 1, 1, 1)
    fills[0, 0] += 0.5                     # crop 0: fill 0 is off, fill 1 off a little, fill 2 exact
    fills[0, 1] += 0.1
    fills[1, 2] += 0.3                     # crop 1: fills 0 and 1 exact (the first wins), 2 off
    fills[:, :, :, 0, 0] += 9.0            # a known pixel: never counted
    assert fill_winners(crops, masks, fills.half()).tolist() == [2, 0]
    p = balanced_draw(np.array([2, 2, 2, 0, 1, 2]), 3)
    np.testing.assert_allclose(p, [1 / 12, 1 / 12, 1 / 12, 1 / 3, 1 / 3, 1 / 12])
    shares = [p[np.array([2, 2, 2, 0, 1, 2]) == k].sum() for k in range(3)]
    np.testing.assert_allclose(shares, [1 / 3] * 3)
    cfg = InpaintTrainConfig(steps=2, batch_size=4, tile=32, pool=6, threads=1, doctor_every=100,
                             balance_fills=True, network=_tiny_blend())
    summary = train_inpainter(cfg, tmp_path / "bal", progress=False)
    assert sum(summary["fill_wins"]) == 6
    assert "--balance-fills" in train_command("inpainter", load_checkpoint(tmp_path / "bal")["train"], tmp_path / "bal")
    with pytest.raises(UsageError, match=r"--balance-fills: not allowed with --head residual; it needs --head blend"):
        train_inpainter(InpaintTrainConfig(steps=1, balance_fills=True, network=ContextEncoderConfig(prefill=True)),
                        tmp_path / "bad", progress=False)


def test_train_inpainter_cli_reports_the_fill_wins_and_the_kept_step(tmp_path, capsys):
    from ganforge.cli import main

    base = ["train", "inpainter", "--steps", "2", "--batch-size", "4", "--tile", "32", "--pool", "6", "--threads", "1",
            "--width", "8", "--prefill", "--fill", "cascade", "--diffuse", "2", "--bilaplace", "2", "--thinplate", "3",
            "--head", "blend", "--blend-thinplate", "3", "--blend-validate", "2", "--val-crops", "4", "--quiet"]
    assert main(base + ["--balance-fills", "--val-every", "1", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "best fill per training pair (thin plate, converged thin plate, cascade): " in out
    assert "validation: kept step " in out and "untrained" in out
    assert main(base + ["--val-every", "-3", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "Error: --val-every: -3 is not allowed; must be >= 0\n"


def _ganforge(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "ganforge", *args], capture_output=True, text=True, timeout=300,
                          cwd=root)


def test_ganforge_train_inpainter_as_typed_writes_a_run_directory_export_reads(tmp_path):
    import json

    from ganforge.training.gan import load_checkpoint

    out = tmp_path / "run"
    r = _ganforge("train", "inpainter", "--steps", "2", "--batch-size", "4", "--tile", "32", "--pool", "8",
                  "--width", "8", "--d-width", "8", "--dilations", "2", "--doctor", "off", "--threads", "1",
                  "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 2 steps in ") and "doctor" not in r.stdout
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "train.json", "metrics.jsonl", "samples.png", "samples"}
    assert not (out / "doctor.md").exists()        # --doctor off
    payload = load_checkpoint(out, ("inpainter",))
    assert set(payload["state"]) == {"net", "D"} and payload["config"]["dilations"] == (2,)
    assert payload["train"]["doctor"] == "off" and json.loads((out / "train.json").read_text())["tile"] == 32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and {"l_rec", "l_adv", "loss_D", "hole_psnr"} <= set(rows[0])


def test_ganforge_train_inpainter_lists_its_own_options_and_refuses_others(tmp_path):
    r = _ganforge("train", "inpainter", "--help")
    assert r.returncode == 0
    for flag in ("--prefill", "--fill", "--diffuse", "--bilaplace", "--thinplate", "--head", "--blend-thinplate",
                 "--blend-validate", "--rec-reduce", "--balance-fills", "--val-every", "--pool", "--tile",
                 "--lambda-rec", "--lambda-adv", "--lr", "--width", "--doctor", "--doctor-every"):
        assert f"  {flag} " in r.stdout or f"  {flag}," in r.stdout, flag
    assert "--patch" not in r.stdout and "--ngf" not in r.stdout and "--lambda-l1" not in r.stdout
    r = _ganforge("train", "inpainter", "--patch", "32", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr == "Error: unrecognized arguments: --patch 32\n"
    r = _ganforge("train", "inpainter", "--tile", "30", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr == "Error: --tile: 30 is not allowed; must be a multiple of 4\n"


def test_the_shipped_inpainter_preset_is_the_make_models_command():
    from ganforge.training import options
    from ganforge.training.inpainting import InpaintTrainConfig

    cfg = options.config_from(InpaintTrainConfig, "inpainter", "photos")
    net = cfg.network
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.pool, cfg.val_every, cfg.balance_fills) == (3000, 32, 1e-3, 4096,
                                                                                               250, True)
    assert (net.width, net.head, net.fill, net.diffuse, net.bilaplace, net.thinplate, net.blend_thinplate,
            net.blend_validate) == (16, "blend", "cascade", 20, 100, 50, 350, 2)
    assert options.config_from(InpaintTrainConfig, "inpainter", "default") == InpaintTrainConfig()


def test_two_gloo_ranks_train_the_blend_as_one_process_does(tmp_path):
    """Pairs, their draw, flips and turns come per item from the data set; L_rec is weighed by
    each rank's share of the batch's hole pixels: 2 ranks end where 1 process ends. (D's conv
    biases before a BatchNorm get no gradient, only rounding noise that Adam scales up: not
    compared.)"""
    from tests.training.test_engine import TOLERANCE, max_diff, run_ranks

    cfg = {"steps": 3, "batch_size": 4, "tile": 32, "pool": 8, "sync_bn": True, "log_every": 1, "doctor_every": 2,
           "checkpoint_every": 100, "balance_fills": True,
           "network": {"width": 8, "d_width": 8, "prefill": True, "fill": "cascade", "diffuse": 2, "bilaplace": 2,
                       "thinplate": 3, "head": "blend", "blend_thinplate": 3, "blend_validate": 2}}
    one = run_ranks(1, "inpainter", tmp_path / "one" / "run", cfg)[0]
    two = run_ranks(2, "inpainter", tmp_path / "two" / "run", cfg)
    weights = lambda r: {"net": r["state"]["net"],
                         "D": {k: v for k, v in r["state"]["D"].items() if k.endswith("weight")}}
    assert max_diff(two[0]["state"], two[1]["state"]) == 0
    assert max_diff(weights(one), weights(two[0])) < TOLERANCE
    assert one["summary"]["l_rec"] == pytest.approx(two[0]["summary"]["l_rec"], abs=1e-5)
