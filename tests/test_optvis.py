"""The hand-chained gradients of the feature-visualization parts (cnnviz.methods.optvis).

Every linear step passes a dot-product test <J v, u> = <v, J^T u>, and every step (linear or not)
matches central finite differences in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from cnnviz.methods import optvis as ov

RNG = np.random.default_rng(1234)


def dot_test(f: Callable, ft: Callable, x: np.ndarray) -> None:
    """<f(v), u> == <v, f^T(u)> for random v, u (f linear)."""
    v = RNG.standard_normal(x.shape)
    y = f(v)
    u = RNG.standard_normal(y.shape)
    lhs = float(np.sum(y * u))
    rhs = float(np.sum(v * ft(u)))
    assert ft(u).shape == x.shape
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def fd_test(f: Callable, vjp: Callable, x: np.ndarray, eps: float = 1e-6) -> None:
    """Directional central difference of <f, u> against <d, vjp(u)> at x."""
    y = f(x)
    u = RNG.standard_normal(y.shape)
    d = RNG.standard_normal(x.shape)
    fd = (np.sum(f(x + eps * d) * u) - np.sum(f(x - eps * d) * u)) / (2 * eps)
    an = float(np.sum(d * vjp(x, u)))
    assert fd == pytest.approx(an, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (6, 5)])
def test_fft_image_adjoint_and_fd(size: tuple[int, int]) -> None:
    h, w = size
    scale = ov.fft_scale(h, w)
    x = np.zeros((2, 3, h, w // 2 + 1, 2))
    dot_test(lambda v: ov.fft_image(v, scale, w), lambda u: ov.fft_image_vjp(u, scale), x)
    fd_test(lambda v: ov.fft_image(v, scale, w), lambda _, u: ov.fft_image_vjp(u, scale), x)


def test_fft_scale_matches_lucent() -> None:
    scale = ov.fft_scale(4, 6)
    assert scale.shape == (4, 4)
    assert scale[0, 0] == pytest.approx(6.0)  # 1 / max(0, 1/6)
    assert scale[1, 2] == pytest.approx(1.0 / np.hypot(0.25, 2 / 6))


def test_decorrelate_adjoint_and_fd() -> None:
    x = np.zeros((2, 3, 4, 5))
    dot_test(ov.decorrelate, ov.decorrelate_vjp, x)
    fd_test(ov.decorrelate, lambda _, u: ov.decorrelate_vjp(u), x)
    assert np.max(np.linalg.norm(ov.COLOR_MATRIX, axis=0)) == pytest.approx(1.0)


def test_sigmoid_fd() -> None:
    x = RNG.standard_normal((2, 3, 4, 4)) * 2
    fd_test(ov.sigmoid, lambda v, u: ov.sigmoid_vjp(ov.sigmoid(v), u), x)


def test_pad_adjoint_and_fd() -> None:
    x = RNG.standard_normal((2, 3, 5, 6))
    dot_test(lambda v: ov.pad(v, 3, 0.0), lambda u: ov.pad_vjp(u, 3), x)
    fd_test(lambda v: ov.pad(v, 3, 0.5), lambda _, u: ov.pad_vjp(u, 3), x)
    assert ov.pad(x, 2, 0.5)[0, 0, 0, 0] == 0.5


def test_crop_adjoint_and_fd() -> None:
    x = RNG.standard_normal((3, 2, 9, 8))
    offsets = np.array([[0, 0], [2, 2], [4, 1]])
    dot_test(lambda v: ov.crop(v, offsets, (5, 6)), lambda u: ov.crop_vjp(u, offsets, (9, 8)), x)
    fd_test(lambda v: ov.crop(v, offsets, (5, 6)), lambda _, u: ov.crop_vjp(u, offsets, (9, 8)), x)
    assert np.array_equal(ov.crop(x, offsets, (5, 6))[1], x[1, :, 2:7, 2:8])


def test_affine_resampling_adjoint_and_fd() -> None:
    x = RNG.standard_normal((3, 2, 11, 9))
    sampling = ov.affine_sampling(
        (11, 9), np.array([0.9, 1.0, 1.1]), np.array([-10, 0, 7]), np.float64
    )
    dot_test(lambda v: ov.resample(v, sampling, 0.0), lambda u: ov.resample_vjp(u, sampling), x)
    fd_test(lambda v: ov.resample(v, sampling, 0.5), lambda _, u: ov.resample_vjp(u, sampling), x)


def test_affine_resampling_geometry() -> None:
    x = RNG.standard_normal((2, 3, 7, 7))
    same = ov.affine_sampling((7, 7), np.array([1.0, 1.0]), np.array([0.0, 90.0]), np.float64)
    out = ov.resample(x, same, 0.5)
    np.testing.assert_allclose(out[0], x[0], atol=1e-12)
    # 90 degrees about the centre of a square: a rot90 (one of the two directions).
    assert np.allclose(out[1], np.rot90(x[1], 1, axes=(1, 2)), atol=1e-9) or np.allclose(
        out[1], np.rot90(x[1], -1, axes=(1, 2)), atol=1e-9
    )
    zoom_out = ov.affine_sampling((7, 7), np.array([0.5]), np.array([0.0]), np.float64)
    corner = ov.resample(np.ones((1, 1, 7, 7)), zoom_out, 0.5)[0, 0, 0, 0]
    assert corner == pytest.approx(0.5)  # read from outside the map: the fill value


def test_resize_adjoint_and_fd() -> None:
    x = RNG.standard_normal((2, 3, 5, 7))
    dot_test(lambda v: ov.resize(v, (9, 12)), lambda u: ov.resize_vjp(u, (5, 7)), x)
    fd_test(lambda v: ov.resize(v, (9, 12)), lambda _, u: ov.resize_vjp(u, (5, 7)), x)
    dot_test(lambda v: ov.resize(v, (3, 4)), lambda u: ov.resize_vjp(u, (5, 7)), x)  # shrink
    np.testing.assert_allclose(ov.resize(x, (5, 7)), x, atol=1e-12)
    assert ov.resize(x, (9, 13))[0, 0, 4, 6] == pytest.approx(x[0, 0, 2, 3])  # aligned corners


@pytest.mark.slow
@pytest.mark.torch
def test_resize_matches_torch() -> None:
    x = RNG.standard_normal((2, 3, 5, 7))
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(9, 12), mode="bilinear", align_corners=True
    ).numpy()
    np.testing.assert_allclose(ov.resize(x, (9, 12)), ref, atol=1e-12)


def test_normalization_adjoint_and_fd() -> None:
    norm = ov.Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0)
    x = RNG.random((2, 3, 4, 4))
    fd_test(norm, lambda _, u: norm.vjp(u), x)
    y = norm(x)
    np.testing.assert_allclose(y[:, 1], (x[:, 1] - 0.456) / 0.224)
    raw = ov.Normalization((0.5,) * 3, (0.5,) * 3, 1.0)  # pixels / 1: x * 255
    np.testing.assert_allclose(raw(x)[:, 0], (x[:, 0] * 255 - 0.5) / 0.5)


def test_fourier_image_chain_fd() -> None:
    param = ov.FourierImage(6, 8)
    spectrum = RNG.standard_normal((2, *param.shape)) * 0.5

    def f(s):
        return ov.FourierImage(6, 8).forward(s)

    def vjp(s, u):
        param.forward(s)
        return param.backward(u)

    fd_test(f, vjp, spectrum)
    out = f(spectrum)
    assert out.shape == (2, 3, 6, 8) and out.min() > 0 and out.max() < 1


def test_transforms_chain_fd_and_sizes() -> None:
    norm = ov.Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0)
    tr = ov.Transforms((16, 16), (24, 24), norm)
    rngs = [np.random.default_rng(i) for i in range(3)]
    draws = [ov.draw_transform(r) for r in rngs]
    x = RNG.random((3, 3, 16, 16))

    def f(v):
        return tr.forward(v, draws)

    def vjp(v, u):
        tr.forward(v, draws)
        return tr.backward(u)

    assert f(x).shape == (3, 3, 24, 24)
    fd_test(f, vjp, x)
    dot_test(lambda v: f(v) - f(np.zeros_like(v)), lambda u: vjp(x, u), x)


def test_draws_cover_lucent_ranges() -> None:
    rng = np.random.default_rng(0)
    draws = [ov.draw_transform(rng) for _ in range(400)]
    assert {d.jitter1[0] for d in draws} == set(range(ov.JITTER1))
    assert {d.jitter2[1] for d in draws} == set(range(ov.JITTER2))
    assert min(d.scale for d in draws) == pytest.approx(0.9)
    assert max(d.angle for d in draws) == 10


def test_adam_first_step_is_lr_times_sign() -> None:
    g = np.array([3.0, -0.5, 1e-3])
    p = ov.Adam(lr=0.05).step(np.zeros(3), g)
    np.testing.assert_allclose(p, -0.05 * np.sign(g), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.torch
def test_adam_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    p0 = RNG.standard_normal(10)
    grads = [RNG.standard_normal(10) for _ in range(5)]
    ours = ov.Adam(lr=0.05)
    p = p0.copy()
    tp = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.Adam([tp], lr=0.05)
    for g in grads:
        p = ours.step(p, g)
        tp.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6)


def test_seed_mode_helpers() -> None:
    g = RNG.standard_normal((2, 3, 4, 4)) * np.array([1.0, 100.0])[:, None, None, None]
    step = ov.normalized_step(g, 0.1)
    rms = np.sqrt(np.mean(step**2, axis=(1, 2, 3)))
    np.testing.assert_allclose(rms, 0.1, rtol=1e-4)
    x = ov.project_ball(np.full((1, 4), 10.0), 2.0)
    assert np.linalg.norm(x) == pytest.approx(2.0)
    d = ov.deprocess(RNG.standard_normal((2, 3, 8, 8)) * 50)
    assert d.min() >= 0 and d.max() <= 1
    assert d.mean() == pytest.approx(0.5, abs=0.02)
