"""The classical hole fills the inpainter learns on: pull-push, harmonic (membrane) diffusion,
the cascade that smooths every pyramid level, and the thin plate solved by conjugate gradients.
Each is written in fixed convolutions, pools and per-image sums, so an exported ONNX graph holds
it; `repeat` runs their many small steps as one ONNX Loop under export.

They have no learned parameters and nothing of training: the inpainter's network (inpaint_nets.py)
calls them in its forward pass, and they are tested on their own (known pixels kept, smooth
surfaces recovered, the biharmonic equation solved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat(n: int, step, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`state = step(*state)`, `n` times. Run eagerly it is a Python loop; under torch.export
    (so in `ganforge export`) it is one `while_loop`, which the ONNX exporter writes as one ONNX
    Loop: the graph holds a single step's ops whatever `n` is, instead of `n` copies of them
    (the blend inpainter's 500-odd fill steps made a 58 MB graph that took ONNX Runtime half a
    minute to load). `step` must return new tensors of the shapes and dtypes it was given."""
    if n <= 0:
        return state
    if not torch.compiler.is_exporting():
        for _ in range(n):
            state = step(*state)
        return state
    from torch._higher_order_ops.while_loop import while_loop

    def cond(i, *_):
        return i < n

    def body(i, *s):
        return (i + 1, *step(*s))

    return tuple(while_loop(cond, body, (torch.zeros((), dtype=torch.int64), *state))[1:])


def _pull(x: torch.Tensor, known: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The pull: (masked sum, known weight) per pyramid level, finest first, by 2x2 averages,
    and the coarsest level's masked mean."""
    levels = []
    v, w = x * known, known
    while min(v.shape[-2:]) >= 2:
        levels.append((v, w))
        v, w = F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)
    fill = v / w.clamp_min(1e-6)
    return levels, fill


def pull_push(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Fill the holes of `x` (B, C, H, W) from its known pixels (`known` (B, 1, H, W), 1 = known)
    by pull-push (Gortler et al., 1996): pull = masked averages down a pyramid, push = each level's
    holes filled from the level below, upsampled, blended by the level's known weight. Known
    pixels come back unchanged; a hole's value is a smooth average of the nearest known ones."""
    levels, fill = _pull(x, known)
    for v, w in reversed(levels):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        a = (w * 2).clamp(0, 1)   # a level's pixel counts as known when half its area is
        fill = a * (v / w.clamp_min(1e-6)) + (1 - a) * up
    return fill


def harmonic_fill(x: torch.Tensor, known: torch.Tensor, iterations: int) -> torch.Tensor:
    """Pull-push, then `iterations` Jacobi steps of Laplace's equation inside the holes (each hole
    pixel becomes the mean of its 3x3 neighbourhood; known pixels stay): the smooth membrane
    inpainting of classical image processing, in a few convolutions an ONNX graph can hold."""
    return _jacobi(x, known, pull_push(x, known), iterations)


def _jacobi(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """`iterations` Jacobi steps of Laplace's equation inside the holes of `u`: each hole pixel
    becomes the mean of its 3x3 neighbourhood, edges replicated; known pixels stay `x`."""
    def step(u):
        return (known * x + (1 - known) * F.avg_pool2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), 3, 1),)

    return repeat(iterations, step, (u,))[0]


BILAPLACIAN = ((0, 0, 1, 0, 0), (0, 2, -8, 2, 0), (1, -8, 20, -8, 1), (0, 2, -8, 2, 0), (0, 0, 1, 0, 0))
BILAPLACE_STEP = 1 / 40   # gradient step on the biharmonic energy: stable below 2/64


def _smooth(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, harmonic: int, bilaplace: int) -> torch.Tensor:
    """`harmonic` Jacobi steps of Laplace's equation, then `bilaplace` gradient steps of the
    biharmonic energy (13-point stencil), inside the holes of `u`; known pixels stay `x`."""
    u = _jacobi(x, known, u, harmonic)
    k = torch.tensor(BILAPLACIAN, dtype=u.dtype, device=u.device).view(1, 1, 5, 5).repeat(u.shape[1], 1, 1, 1)

    def step(u):
        grad = F.conv2d(F.pad(u, (2, 2, 2, 2), mode="replicate"), k, groups=u.shape[1])
        return (known * x + (1 - known) * (u - BILAPLACE_STEP * grad),)

    return repeat(bilaplace, step, (u,))[0]


def cascade_fill(x: torch.Tensor, known: torch.Tensor, harmonic: int, bilaplace: int) -> torch.Tensor:
    """Pull-push whose push smooths every level: down the pyramid by masked averages (pull);
    then from the coarsest level up, the level below is upsampled into this level's holes and
    smoothed there (`_smooth`), a pixel counting as known when its whole area is. The smooth
    membrane (harmonic) and thin-plate (biharmonic) fills of classical inpainting, converged on
    large holes in a few hundred fixed steps because each level starts from the coarser one
    (its scores against the other fills: docs/inpainting.md)."""
    levels, fill = _pull(x, known)
    for v, w in reversed(levels):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        k = (w > 0.999).to(v.dtype)
        xv = v / w.clamp_min(1e-6)
        fill = _smooth(xv, k, k * xv + (1 - k) * up, harmonic, bilaplace)
    return fill


LAPLACIAN = ((0, 1, 0), (1, -4, 1), (0, 1, 0))
CG_TOLERANCE = 1e-14   # thin_plate_fill: a system's squared residual, relative to its start, where it stops


def _laplacian_kernel(u: torch.Tensor) -> torch.Tensor:
    """LAPLACIAN as a depthwise (C, 1, 3, 3) kernel for `u`'s channels, dtype and device."""
    return torch.tensor(LAPLACIAN, dtype=u.dtype, device=u.device).view(1, 1, 3, 3).repeat(u.shape[1], 1, 1, 1)


def _laplacian(u: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    """The 5-point Laplacian of (B, C, H, W) `u`, edges replicated (zero flux across the border)."""
    k = _laplacian_kernel(u) if k is None else k
    return F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), k, groups=u.shape[1])


def _laplacian_adjoint(v: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of `_laplacian`: the transposed convolution, then each replicated border
    row and column folded back onto the edge it copies."""
    k = _laplacian_kernel(v) if k is None else k
    g = F.conv_transpose2d(v, k, groups=v.shape[1])                                  # (B, C, H+2, W+2)
    g = torch.cat([g[:, :, 1:2] + g[:, :, :1], g[:, :, 2:-2], g[:, :, -2:-1] + g[:, :, -1:]], dim=2)
    return torch.cat([g[..., 1:2] + g[..., :1], g[..., 2:-2], g[..., -2:-1] + g[..., -1:]], dim=3)  # (B, C, H, W)


def thin_plate_fill(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """`iterations` conjugate-gradient steps, from the fill `u`, towards the minimum of the
    thin-plate energy `sum (Laplacian u)^2` over the hole's pixels, known pixels held at `x`:
    the biharmonic inpainting that scikit-image's `inpaint_biharmonic` solves with a sparse
    factorisation, here as fixed convolutions and per-image sums an ONNX graph can hold. Each
    image and channel is its own system (its own step sizes); an image without a hole is left
    as it is. CG needs a good start, hence the cascade before it (how close a few dozen steps
    come to the solver: docs/inpainting.md)."""
    hole, k = 1 - known, _laplacian_kernel(u)              # the kernel built once, not per step
    u = known * x + hole * u
    r = -hole * _laplacian_adjoint(_laplacian(u, k), k)    # minus the energy's gradient, in the hole
    rr = (r * r).sum((2, 3), keepdim=True)                 # (B, C, 1, 1)
    # A system stops where it has converged as far as float32 goes (squared residual 1e-14 of
    # its start): past that, rounding makes the step sizes noise and the iterates blow up
    # (ONNX Runtime's sums reach NaN within a few hundred steps where torch's happen not to).
    done = rr * CG_TOLERANCE

    def step(u, r, p, rr):
        ap = hole * _laplacian_adjoint(_laplacian(p, k), k)
        pap = (p * ap).sum((2, 3), keepdim=True)
        live = (rr > done) & (pap > 0)
        alpha = torch.where(live, rr / torch.where(live, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        r_next = r - alpha * ap
        rr_next = (r_next * r_next).sum((2, 3), keepdim=True)
        beta = torch.where(live, rr_next / torch.where(live, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        return u + alpha * p, r_next, r_next + beta * p, rr_next

    return repeat(iterations, step, (u, r, r.clone(), rr))[0]
