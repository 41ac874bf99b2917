"""Feature-visualization parts in numpy: an image parameterization, random transforms, Adam.

Lucent's recipe (greentfrapp/lucent, optvis/param and optvis/transform), rewritten so that the
gradient of every step is chained by hand around the model's vector-Jacobian product, which
ONNX Runtime computes. Each linear (or elementwise) step has a forward function and its exact
adjoint, named `<step>` and `<step>_vjp`; tests check every pair with a dot-product test and
finite differences. All functions work on a batch [B, C, H, W] and keep the input's dtype.

Image parameterization (lucent `param.image(128, fft=True, decorrelate=True)`):
    spectrum [B, 3, h, w//2+1, 2] --fft_image--> [B, 3, h, w] --decorrelate--> --sigmoid--> [0, 1]
Transforms per optimization step (lucent `standard_transforms`; one draw per batch item):
    pad(12, 0.5) -> crop jitter(8) -> scale x rotate (one bilinear affine resampling, fill 0.5)
    -> crop jitter(4) -> bilinear resize to the model's input size -> the model's normalization.
Lucent scales by resizing the canvas; here scale and rotation are one resampling into a canvas of
the same size (a zoom of the content), which has one exact adjoint.

`optvis_graph` writes the same parts as ONNX ops (the optimization step as one graph, engine
"graph" of `filters`); these numpy versions are its reference (tests) and the "numpy" engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

# lucent param/color.py: square root of the ImageNet colour correlation matrix (via its SVD).
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64
)
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / np.max(
    np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0)
)
FFT_MAGIC = 4.0  # lucent divides the spatial image by this "magic" constant
PAD, JITTER1, JITTER2 = 12, 8, 4
SCALES = tuple(1.0 + (i - 5) / 50.0 for i in range(11))  # 0.90 ... 1.10
ANGLES = tuple(range(-10, 11)) + (0,) * 5  # degrees; lucent weights 0 more often
FILL = 0.5  # grey: the value of padding and of pixels rotated in from outside


# ----------------------------------------------------------------------------- Fourier basis


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> np.ndarray:
    """[h, w//2+1]: lucent's spectrum scale 1 / max(|f|, 1/max(h, w)) ** decay_power."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power


def fft_image(spectrum: np.ndarray, scale: np.ndarray, w: int) -> np.ndarray:
    """[B, C, h, w//2+1, 2] (real, imag) -> [B, C, h, w]: irfft2(scale * spectrum, ortho) / 4."""
    z = _as_complex(spectrum) * scale
    image = np.fft.irfft2(z, s=(spectrum.shape[-3], w), norm="ortho") / FFT_MAGIC
    return image.astype(spectrum.dtype, copy=False)


def fft_image_vjp(grad: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Adjoint of `fft_image`, a real-linear map of the spectrum's real and imaginary parts.

    irfft2 is an ortho ifft over rows, then a c2r transform along the last axis that counts each
    half-spectrum column twice except the DC column (and the Nyquist column when w is even),
    whose imaginary parts it ignores. Its adjoint is rfft along the last axis with those columns
    weighted 1 and the others 2 (the DC/Nyquist results are real, matching the ignored
    imaginary parts), then the ortho fft over rows: weights * rfft2(grad, ortho).
    """
    w = grad.shape[-1]
    weights = np.full(w // 2 + 1, 2.0)
    weights[0] = 1.0
    if w % 2 == 0:
        weights[-1] = 1.0
    g = np.fft.rfft2(grad, norm="ortho") * (weights * scale / FFT_MAGIC)
    return np.stack([g.real, g.imag], axis=-1).astype(grad.dtype, copy=False)


def _as_complex(pairs: np.ndarray) -> np.ndarray:
    """[..., 2] (real, imag) -> complex [...], a view when the pairs are contiguous floats."""
    if pairs.dtype in (np.float32, np.float64) and pairs.flags.c_contiguous:
        kind = np.complex64 if pairs.dtype == np.float32 else np.complex128
        return pairs.view(kind)[..., 0]
    return pairs[..., 0] + 1j * pairs[..., 1]


# ----------------------------------------------------------------------------- colour, sigmoid


def decorrelate(x: np.ndarray) -> np.ndarray:
    """Per pixel, colour vector v -> COLOR_MATRIX @ v (lucent's `_linear_decorrelate_color`)."""
    return _colour_mix(COLOR_MATRIX, x)


def decorrelate_vjp(grad: np.ndarray) -> np.ndarray:
    return _colour_mix(COLOR_MATRIX.T, grad)


def _colour_mix(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """matrix @ (colour vector) at every pixel of [B, 3, H, W].

    Nine scaled adds rather than a matmul: BLAS threads would compete with ONNX Runtime's.
    """
    out = np.zeros_like(x)
    for c in range(matrix.shape[0]):
        for k in range(matrix.shape[1]):
            out[:, c] += x[:, k] * x.dtype.type(matrix[c, k])
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype, copy=False)


def sigmoid_vjp(y: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Adjoint of sigmoid given its output y: grad * y * (1 - y)."""
    return grad * y * (1.0 - y)


# ----------------------------------------------------------------------------- pad, crop


def pad(x: np.ndarray, width: int, value: float = FILL) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (width, width), (width, width)), constant_values=value)


def pad_vjp(grad: np.ndarray, width: int) -> np.ndarray:
    if width == 0:
        return grad
    return grad[:, :, width:-width, width:-width]


def crop(x: np.ndarray, offsets: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per item b, the window [top, left] = offsets[b] of `size` (lucent's jitter)."""
    h, w = size
    return np.stack([x[b, :, t : t + h, s : s + w] for b, (t, s) in enumerate(offsets)])


def crop_vjp(grad: np.ndarray, offsets: np.ndarray, in_size: tuple[int, int]) -> np.ndarray:
    out = np.zeros(grad.shape[:2] + tuple(in_size), dtype=grad.dtype)
    h, w = grad.shape[2:]
    for b, (t, s) in enumerate(offsets):
        out[b, :, t : t + h, s : s + w] = grad[b]
    return out


# ----------------------------------------------------------------------------- affine resampling


@dataclass(frozen=True)
class Sampling:
    """Bilinear sampling positions for a batch: four taps per output pixel into padded maps.

    Each item's map is padded with one zero row/column before and two after, so a position up
    to one pixel outside the map interpolates towards zero and nothing indexes out of range.
    `index` holds flat indices into the whole padded batch [B * Hp * Wp], so one gather serves
    all items and one bincount per channel is the adjoint.
    """

    index: np.ndarray  # [4, B * N] int64 into the padded batch
    weight: np.ndarray  # [4, B * N]
    batch: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]


def affine_sampling(
    in_size: tuple[int, int], scales: np.ndarray, angles_deg: np.ndarray, dtype=np.float32
) -> Sampling:
    """Positions that zoom by `scales[b]` and rotate by `angles_deg[b]` about the centre.

    Output pixel p reads input position c + R(-angle) (p - c) / scale, with c the centre; the
    output has the input's size.
    """
    h, w = in_size
    dy, dx = _centred_grid(h, w)
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]
    inv = 1.0 / np.asarray(scales, dtype=np.float64)[:, None]
    cos, sin = (inv * np.cos(theta)).astype(dtype), (inv * np.sin(theta)).astype(dtype)
    src_y = (h - 1) / 2.0 + cos * dy - sin * dx
    src_x = (w - 1) / 2.0 + sin * dy + cos * dx
    return bilinear_sampling(src_y, src_x, in_size, (h, w), dtype)


@functools.lru_cache(maxsize=8)
def _centred_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    dy = (rows - (h - 1) / 2.0).ravel().astype(np.float32)
    dx = (cols - (w - 1) / 2.0).ravel().astype(np.float32)
    return dy, dx


def bilinear_sampling(
    src_y: np.ndarray, src_x: np.ndarray, in_size: tuple[int, int], out_size: tuple[int, int],
    dtype=np.float32,
) -> Sampling:
    """Sampling at input positions src_y/src_x [B, N] (N = output pixels, row-major)."""
    h, w = in_size
    batch = src_y.shape[0]
    wp, size = w + 3, (h + 3) * (w + 3)
    y = np.clip(src_y, -1.0, float(h))
    x = np.clip(src_x, -1.0, float(w))
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = (y - y0).astype(dtype), (x - x0).astype(dtype)
    base = (y0.astype(np.int64) + 1) * wp + (x0.astype(np.int64) + 1)  # +1: the leading pad
    base += (np.arange(batch, dtype=np.int64) * size)[:, None]
    base = base.ravel()
    index = np.stack([base, base + 1, base + wp, base + wp + 1])
    fy, fx = fy.ravel(), fx.ravel()
    gy, gx = 1 - fy, 1 - fx
    weight = np.stack([gy * gx, gy * fx, fy * gx, fy * fx])
    return Sampling(index, weight, batch, (h, w), tuple(out_size))


def resample(x: np.ndarray, sampling: Sampling, fill: float = FILL) -> np.ndarray:
    """Bilinear resampling; positions outside the map read `fill` (the map minus fill is zero
    padded, then fill is added back: an affine map whose linear part is `resample_vjp`'s)."""
    b, c = x.shape[:2]
    padded = np.pad(x - fill, ((0, 0), (0, 0), (1, 2), (1, 2)))
    flat = np.ascontiguousarray(padded.transpose(1, 0, 2, 3)).reshape(c, -1)  # colour planes
    weight = sampling.weight.astype(x.dtype, copy=False)
    out = np.empty((c, sampling.index.shape[1]), dtype=x.dtype)
    for ch in range(c):
        out[ch] = np.einsum("kn,kn->n", np.take(flat[ch], sampling.index), weight)
    out = out.reshape(c, b, *sampling.out_size).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(out) + np.asarray(fill, dtype=x.dtype)


def resample_vjp(grad: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Adjoint of `resample`'s linear part: scatter-add the weighted gradient (np.bincount)."""
    b, c = grad.shape[:2]
    h, w = sampling.in_size
    total = b * (h + 3) * (w + 3)
    g = np.ascontiguousarray(grad.transpose(1, 0, 2, 3)).reshape(c, -1)
    index = sampling.index.ravel()
    out = np.empty((c, total), dtype=grad.dtype)
    for ch in range(c):
        vals = (sampling.weight * g[ch]).ravel()
        out[ch] = np.bincount(index, weights=vals, minlength=total)
    out = out.reshape(c, b, h + 3, w + 3).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(out[:, :, 1 : h + 1, 1 : w + 1])


# ----------------------------------------------------------------------------- resize, normalize


def resize_matrix(n_in: int, n_out: int, dtype=np.float64) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation along one axis, align_corners=True (as lucent)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m.astype(dtype)
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m.astype(dtype)


@functools.lru_cache(maxsize=32)
def _row_taps(n_in: int, n_out: int, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """The nonzeros of each row of the resize matrix (or its transpose), padded to equal count:
    (columns [rows, K], values [rows, K]); applying it is K gathers, not a dense product."""
    m = resize_matrix(n_in, n_out)
    if transpose:
        m = m.T
    k = max(1, int((m != 0).sum(axis=1).max()))
    cols = np.zeros((m.shape[0], k), dtype=np.int64)
    vals = np.zeros((m.shape[0], k), dtype=np.float64)
    for r in range(m.shape[0]):
        nz = np.flatnonzero(m[r])
        cols[r, : len(nz)] = nz
        vals[r, : len(nz)] = m[r, nz]
    return cols, vals


def _along_last(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    cols, vals = taps
    vals = vals.astype(x.dtype)
    out = np.take(x, cols[:, 0], axis=-1) * vals[:, 0]
    for k in range(1, cols.shape[1]):
        out += np.take(x, cols[:, k], axis=-1) * vals[:, k]
    return out


def _separable(x: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """Apply a row-sparse matrix along W, then another along H."""
    t = _along_last(x, cols)
    t = _along_last(np.ascontiguousarray(t.swapaxes(-1, -2)), rows)
    return np.ascontiguousarray(t.swapaxes(-1, -2))


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Separable bilinear resize [B, C, h, w] -> [B, C, *size] (align_corners=True)."""
    h, w = x.shape[-2:]
    return _separable(x, _row_taps(h, size[0], False), _row_taps(w, size[1], False))


def resize_vjp(grad: np.ndarray, in_size: tuple[int, int]) -> np.ndarray:
    """Adjoint of `resize`: the transposed interpolation matrices, applied the same way."""
    h, w = grad.shape[-2:]
    return _separable(
        grad, _row_taps(in_size[0], h, True), _row_taps(in_size[1], w, True)
    )


@dataclass(frozen=True)
class Normalization:
    """The model's preprocessing of an image in [0, 1]: (x * 255 / scale - mean) / std."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 255.0

    @classmethod
    def from_preprocess(cls, pre: dict) -> Normalization:
        from ..images import normalization

        scale, mean, std = normalization(pre)  # RGB order, as images.preprocess
        return cls(tuple(map(float, mean)), tuple(map(float, std)), float(scale))

    def _coef(self, dtype) -> tuple[np.ndarray, np.ndarray]:
        gain = (255.0 / self.scale) / np.asarray(self.std, dtype=np.float64)
        shift = np.asarray(self.mean, dtype=np.float64) / np.asarray(self.std, dtype=np.float64)
        return gain.astype(dtype)[:, None, None], shift.astype(dtype)[:, None, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gain, shift = self._coef(x.dtype)
        return x * gain - shift

    def vjp(self, grad: np.ndarray) -> np.ndarray:
        gain, _ = self._coef(grad.dtype)
        return grad * gain


# ----------------------------------------------------------------------------- the image parameter


@dataclass
class FourierImage:
    """lucent's image(h, w, fft=True, decorrelate=True): sigmoid(colour(fft(spectrum))).

    `forward` keeps what `backward` needs; call them in pairs.
    """

    h: int
    w: int
    decay_power: float = 1.0
    scale: np.ndarray = field(init=False, repr=False)
    _y: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scale = fft_scale(self.h, self.w, self.decay_power)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The spectrum's shape per item: [3, h, w//2+1, 2]."""
        return (3, self.h, self.w // 2 + 1, 2)

    def init(self, rng: np.random.Generator, sd: float = 0.01) -> np.ndarray:
        return (rng.standard_normal(self.shape) * sd).astype(np.float32)

    def forward(self, spectrum: np.ndarray) -> np.ndarray:
        self._y = sigmoid(decorrelate(fft_image(spectrum, self.scale.astype(spectrum.dtype),
                                                self.w)))
        return self._y

    def backward(self, grad: np.ndarray) -> np.ndarray:
        if self._y is None:
            raise RuntimeError("FourierImage.backward needs a forward first")
        g = decorrelate_vjp(sigmoid_vjp(self._y, grad))
        return fft_image_vjp(g, self.scale.astype(grad.dtype))


# ----------------------------------------------------------------------------- random transforms


@dataclass(frozen=True)
class TransformDraw:
    """One step's random choices for one batch item."""

    jitter1: tuple[int, int]
    scale: float
    angle: float
    jitter2: tuple[int, int]


def draw_transform(rng: np.random.Generator) -> TransformDraw:
    """lucent's standard_transforms draws (jitter 8, scale, rotate, jitter 4) from one stream."""
    j1 = rng.integers(0, JITTER1, size=2)
    scale = SCALES[int(rng.integers(0, len(SCALES)))]
    angle = ANGLES[int(rng.integers(0, len(ANGLES)))]
    j2 = rng.integers(0, JITTER2, size=2)
    return TransformDraw((int(j1[0]), int(j1[1])), float(scale), float(angle),
                         (int(j2[0]), int(j2[1])))


class Transforms:
    """pad -> jitter -> scale x rotate -> jitter -> resize -> normalize, with its adjoint.

    `forward(images, draws)` keeps the per-item samplings; `backward(grad)` chains the adjoints.
    """

    def __init__(self, size: tuple[int, int], out_size: tuple[int, int], norm: Normalization):
        self.size = tuple(size)
        self.out_size = tuple(out_size)
        self.norm = norm
        h, w = self.size
        self.padded = (h + 2 * PAD, w + 2 * PAD)
        self.cropped1 = (self.padded[0] - JITTER1, self.padded[1] - JITTER1)
        self.cropped2 = (self.cropped1[0] - JITTER2, self.cropped1[1] - JITTER2)
        self._state: tuple | None = None

    def forward(self, images: np.ndarray, draws: list[TransformDraw]) -> np.ndarray:
        off1 = np.array([d.jitter1 for d in draws])
        off2 = np.array([d.jitter2 for d in draws])
        sampling = affine_sampling(
            self.cropped1, np.array([d.scale for d in draws]), np.array([d.angle for d in draws]),
            images.dtype,
        )
        x = crop(pad(images, PAD), off1, self.cropped1)
        x = crop(resample(x, sampling), off2, self.cropped2)
        self._state = (off1, off2, sampling)
        return self.norm(resize(x, self.out_size))

    def backward(self, grad: np.ndarray) -> np.ndarray:
        if self._state is None:
            raise RuntimeError("Transforms.backward needs a forward first")
        off1, off2, sampling = self._state
        g = resize_vjp(self.norm.vjp(grad), self.cropped2)
        g = resample_vjp(crop_vjp(g, off2, self.cropped1), sampling)
        return pad_vjp(crop_vjp(g, off1, self.padded), PAD)

    def plain(self, images: np.ndarray) -> np.ndarray:
        """The untransformed image as the model sees it: resize and normalize only."""
        return self.norm(resize(images, self.out_size))


# ----------------------------------------------------------------------------- Adam


class Adam:
    """torch.optim.Adam's update (no weight decay), elementwise, so batch items stay independent.

    `step(params, grad)` *descends*; pass the negated gradient to ascend.
    """

    def __init__(self, lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(params), np.zeros_like(params)
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return (params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(params.dtype)


# ----------------------------------------------------------------------------- seed mode helpers


def normalized_step(grad: np.ndarray, step: float) -> np.ndarray:
    """Chollet's step: each item's gradient divided by its root mean square (+1e-5), times step."""
    axes = tuple(range(1, grad.ndim))
    rms = np.sqrt(np.mean(grad * grad, axis=axes, keepdims=True))
    return grad / (rms + 1e-5) * step


def project_ball(x: np.ndarray, radius: float) -> np.ndarray:
    """Each item scaled back onto the L2 ball of `radius` (about 0) when outside it."""
    axes = tuple(range(1, x.ndim))
    norm = np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
    return x * np.minimum(1.0, radius / np.maximum(norm, 1e-12))


def deprocess(x: np.ndarray) -> np.ndarray:
    """Chollet's deprocess_image per item: centre, std to 0.1, shift to 0.5, clip to [0, 1]."""
    axes = tuple(range(1, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    x = x / (x.std(axis=axes, keepdims=True) + 1e-5) * 0.1 + 0.5
    return np.clip(x, 0.0, 1.0)
