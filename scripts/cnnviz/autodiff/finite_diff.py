"""Central finite differences through ONNX Runtime (numpy only): the engine's independent check.

The scalar differentiated is `<seed, f(x)>` (or any `output_fn` of the outputs), and the result is
its directional derivative along K directions: coordinate directions (the gradient at chosen
coordinates), arbitrary directions, or Grad-CAM's per-channel all-ones maps. The 2K perturbed
inputs go through one session in chunks of `batch_size`, so the model needs a free batch axis
(exports have one; for an intermediate tensor use `tail_model`).

Float32 forward passes make FD a sanity check, not an elementwise oracle: the error is
O(eps^2 f''') + O(ulp(f) / eps), and a ReLU/Clip/MaxPool kink within eps of the point bends it
further. Compare by cosine; expect near-exact values only where the function is linear near x
(e.g. a GlobalAveragePool + Gemm head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime import run_batched
from .tail import tail_model

OutputFn = Callable[[dict[str, np.ndarray]], np.ndarray]
DirectionFn = Callable[[int, int], np.ndarray]


def central_differences(
    session: ort.InferenceSession,
    input_name: str,
    x: np.ndarray,
    *,
    seed: np.ndarray | dict[str, np.ndarray] | None = None,
    output_name: str | None = None,
    output_fn: OutputFn | None = None,
    directions: np.ndarray | DirectionFn | None = None,
    num_directions: int | None = None,
    coordinates: np.ndarray | None = None,
    eps: float = 1e-3,
    batch_size: int = 64,
    extra_feeds: dict[str, np.ndarray] | None = None,
    one_sided: bool = False,
) -> np.ndarray:
    """Directional derivatives of `<seed, f(x)>` along K directions, as a float64 array [K].

    x: one sample, shape [1, ...]. The scalar is either `sum(seed * outputs[output_name])`
    (seed shaped like one sample's output; output_name defaults to the first output; a dict
    {output name: seed} sums over several outputs), or
    `output_fn(outputs) -> [B]` over a batch of outputs (a dict name -> array).
    directions: [K, ...] (x's shape without the batch axis), or a callable `(start, stop) ->
    directions[start:stop]` with `num_directions` (generated per chunk: Grad-CAM's K x C x H x W
    would not fit). Default: the coordinate directions at `coordinates` (flat indices into x;
    default all). For coordinate directions the step actually taken in float32 is divided out.
    extra_feeds: other inputs of the session, one sample each; repeated along the batch.
    batch_size: rows per session run (1 works for models without a free batch axis).
    one_sided: return [K, 3] = (central, forward, backward) differences. Forward and backward
    agree to O(eps) where f is smooth and differ by O(1) across a kink (ReLU, Clip, MaxPool
    switch) within eps of x: the way to tell a kink from a wrong gradient.
    """
    if x.shape[0] != 1:
        raise ValueError(f"x must hold one sample [1, ...], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    sample_shape = x.shape[1:]
    if (seed is None) == (output_fn is None):
        raise ValueError("give exactly one of seed and output_fn")
    delta = _seed_delta(session, seed, output_name) if output_fn is None else None
    coords = None
    if directions is None:
        coords = np.arange(x.size) if coordinates is None else np.asarray(coordinates).ravel()
        total = len(coords)
        get = _coordinate_directions(coords, sample_shape)
    elif callable(directions):
        if num_directions is None:
            raise ValueError("a direction callable needs num_directions")
        total, get = num_directions, directions
    else:
        directions = np.asarray(directions, dtype=np.float32)
        if directions.shape[1:] != sample_shape:
            raise ValueError(f"directions {directions.shape} do not match x {x.shape}")
        total = len(directions)

        def get(start: int, stop: int) -> np.ndarray:
            return directions[start:stop]

    extras = extra_feeds or {}
    names = [o.name for o in session.get_outputs()]

    def run(inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {input_name: inputs}
        for name, value in extras.items():
            feeds[name] = np.repeat(value, len(inputs), axis=0)
        if len(inputs) <= batch_size:
            return dict(zip(names, session.run(names, feeds), strict=True))
        return dict(zip(names, run_batched(session, feeds, names, batch_size), strict=True))

    base = run(x) if one_sided else None
    half = max(1, batch_size // 2)
    out = np.empty((total, 3), dtype=np.float64)
    for start in range(0, total, half):
        stop = min(start + half, total)
        k = stop - start
        step = np.float32(eps) * np.asarray(get(start, stop), dtype=np.float32)
        both = np.empty((2 * k, *sample_shape), dtype=np.float32)
        plus, minus = both[:k], both[k:]
        np.add(x, step, out=plus)
        np.subtract(x, step, out=minus)
        del step
        outputs = run(both)
        upper = {name: value[:k] for name, value in outputs.items()}
        lower = {name: value[k:] for name, value in outputs.items()}
        if delta is not None:
            diffs = [delta(upper, lower)]
            if base is not None:
                diffs += [delta(upper, base), delta(base, lower)]
        else:
            s_up, s_low = (np.asarray(output_fn(o), dtype=np.float64) for o in (upper, lower))
            diffs = [s_up - s_low]
            if base is not None:
                s_0 = float(np.asarray(output_fn(base), dtype=np.float64)[0])
                diffs += [s_up - s_0, s_0 - s_low]
        if coords is not None:
            rows = np.arange(k)
            flat = coords[start:stop]
            x_i = x.reshape(-1)[flat].astype(np.float64)
            up_i = plus.reshape(k, -1)[rows, flat].astype(np.float64)
            low_i = minus.reshape(k, -1)[rows, flat].astype(np.float64)
            steps = [up_i - low_i, up_i - x_i, x_i - low_i]
        else:
            steps = [2.0 * eps, eps, eps]
        for col, (diff, step) in enumerate(zip(diffs, steps, strict=False)):
            out[start:stop, col] = diff / step
    return out if one_sided else out[:, 0]


def _seed_delta(
    session: ort.InferenceSession,
    seed: np.ndarray | dict[str, np.ndarray] | None,
    output_name: str | None,
) -> Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], np.ndarray]:
    """`<seed, f(a)> - <seed, f(b)>` per row, subtracting the outputs before summing.

    Subtracting the two float32 outputs elementwise first is exact for close values (Sterbenz)
    and leaves exact zeros where the perturbation did not reach, so the untouched outputs'
    rounding cancels instead of swamping the sum; the dot product is then one matrix-vector
    product (float32 inputs, a few nonzero terms per row).
    """
    if not isinstance(seed, dict):
        seed = {output_name or session.get_outputs()[0].name: seed}
    seeds = {name: np.asarray(value, dtype=np.float32).ravel() for name, value in seed.items()}

    def delta(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
        total = 0.0
        for name, s in seeds.items():
            diff = np.subtract(a[name], b[name], dtype=np.float32)
            rows = diff.reshape(len(diff), -1)
            total = total + (rows @ s).astype(np.float64)
        return total

    return delta


def _coordinate_directions(coords: np.ndarray, sample_shape: tuple[int, ...]) -> DirectionFn:
    size = int(np.prod(sample_shape))

    def get(start: int, stop: int) -> np.ndarray:
        d = np.zeros((stop - start, size), dtype=np.float32)
        d[np.arange(stop - start), coords[start:stop]] = 1.0
        return d.reshape((stop - start, *sample_shape))

    return get


def random_coordinates(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct flat indices out of `size`, sorted (all of them when count >= size)."""
    if count >= size:
        return np.arange(size)
    return np.sort(rng.choice(size, size=count, replace=False))


def gradcam_weights_fd(
    session: ort.InferenceSession,
    input_name: str,
    feature: np.ndarray,
    *,
    seed: np.ndarray | None = None,
    output_name: str | None = None,
    output_fn: OutputFn | None = None,
    eps: float = 1e-2,
    batch_size: int = 256,
    extra_feeds: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Grad-CAM channel weights alpha_k = mean over (h, w) of d<seed, f>/dA[k, h, w], by FD.

    The derivative along channel k's all-ones map divided by H*W is exactly that mean, so one
    directional difference per channel suffices. (Dividing after differencing, not scaling the
    map by 1/(H W), keeps the step eps per element: float32 noise ~ ulp(f) / step.) `session`
    runs the tail from the feature tensor (`tail_session`); feature: [1, C, H, W]. Returns
    float64 [C].
    """
    channels = feature.shape[1]
    spatial = int(np.prod(feature.shape[2:]))

    def channel_maps(start: int, stop: int) -> np.ndarray:
        d = np.zeros((stop - start, *feature.shape[1:]), dtype=np.float32)
        for i, k in enumerate(range(start, stop)):
            d[i, k] = 1.0
        return d

    return (
        central_differences(
            session,
            input_name,
            feature,
            seed=seed,
            output_name=output_name,
            output_fn=output_fn,
            directions=channel_maps,
            num_directions=channels,
            eps=eps,
            batch_size=batch_size,
            extra_feeds=extra_feeds,
        )
        / spatial
    )


def tail_session(
    model: onnx.ModelProto,
    tensor: str,
    device: str = "cpu",
    threads: int | None = None,
    outputs: list[str] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """A session running the model from `tensor` on (batchable), and the name of its input."""
    from ..runtime import make_session

    tail = tail_model(model, tensor, outputs)
    return make_session(tail, device=device, threads=threads), tail.graph.input[0].name


def tensor_values(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    tensors: list[str],
    device: str = "cpu",
    threads: int | None = None,
) -> list[np.ndarray]:
    """Run the model and return the values of (intermediate) tensors."""
    from ..runtime import make_session

    session = make_session(expose_tensors(model, tensors), device=device, threads=threads)
    return session.run(tensors, feeds)


def expose_tensors(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` with `tensors` added as graph outputs (cnnviz.graph.expose if present)."""
    try:
        from ..graph import expose  # type: ignore[attr-defined]

        return expose(model, tensors)
    except ImportError:
        pass
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    return exposed


# ---------------------------------------------------------------------------- comparisons

KINK = 0.05  # |forward - backward| above this fraction of max|central|: a kink within eps


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """cosine, scale and max|got - ref| / max|ref| of two flat arrays."""
    got, ref = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return {
        "n": int(ref.size),
        "cosine": cosine(got, ref),
        "scale": scale(got, ref),
        "max_rel_err": rel_err(got, ref),
    }


def scale(got: np.ndarray, ref: np.ndarray) -> float:
    """The least-squares factor s in got ~ s * ref: cosine misses a uniformly scaled map."""
    den = float(ref @ ref)
    return float(got @ ref) / den if den > 0 else float("nan")


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref| (1.0 when ref is all zero and got is not)."""
    scale = float(np.abs(ref).max())
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    return diff / scale if scale > 0 else float(diff > 0)


def compare_fd(got: np.ndarray, fd: np.ndarray) -> dict[str, Any]:
    """Like `compare` against FD [n, 3] (central, forward, backward), forgiving kinks.

    A coordinate's error is its distance to the nearest of the central and the two one-sided
    differences: with a kink within eps on one side, the one-sided difference on the other
    side is the derivative at x, and the central one is off by up to half the jump. Kinks
    (forward and backward differing by more than KINK of the scale) are counted, and the
    cosine is taken over the other coordinates.
    """
    got = got.astype(np.float64)
    central, forward, backward = fd[:, 0], fd[:, 1], fd[:, 2]
    top = np.abs(central).max()
    kink = np.abs(forward - backward) > KINK * top
    err = np.min(np.abs(got[:, None] - fd), axis=1)
    smooth = ~kink if (~kink).any() else np.ones_like(kink)
    return {
        "n": int(got.size),
        "kinks": int(kink.sum()),
        "cosine": cosine(got[smooth], central[smooth]),
        "scale": scale(got[smooth], central[smooth]),
        "max_rel_err": float(err.max() / top) if top > 0 else float(np.abs(got).max() > 0),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))
