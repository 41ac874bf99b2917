"""The one runner: a method's graph in one ONNX Runtime session, fed in chunks, bound on the device.

A `MethodGraph` (cnnviz.methodgraph) has static shapes: `images` images per call, `points` points
per image. `Runner.run` takes a job's whole arrays and

- chunks the per-image inputs by `images` and the per-point inputs by `points`, padding the last
  chunk (zeros, or the graph's `point_padding` value, which makes a padded point contribute
  nothing) and dropping the padded rows from the results;
- binds inputs and outputs with ONNX Runtime's I/O binding: each chunk of images crosses to the
  device once and its results come back once; inputs fixed for the job (noise, baselines, path
  weights) and the point chunks are copied to the device once per job and stay bound;
- adds `summed` outputs over point chunks and joins `per_point` outputs along the points axis.

The device is the session's: CUDA when `device` resolves to it (cnnviz.runtime), else the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from .methodgraph import MethodGraph
from .runtime import make_session


def chunk_plan(n_points: int, rows: int) -> tuple[int, int]:
    """(images, points) per call so that images * points <= max(rows, points): all of an
    image's points in one call when they fit in `rows`, else `rows` points per call."""
    points = max(1, min(n_points, rows))
    return max(1, rows // points), points


class Runner:
    """One session of one method graph, built once per job."""

    def __init__(self, graph: MethodGraph, device: str = "auto", threads: int | None = None):
        self.graph = graph
        self.session = make_session(graph.model, device, threads)
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = "cuda" if on_cuda else "cpu"
        self.binding = self.session.io_binding()
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._fixed: dict[str, ort.OrtValue] = {}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def bind_fixed(self, fixed: Mapping[str, np.ndarray]) -> None:
        """Copy inputs that stay the same for the job to the device once."""
        for name, value in fixed.items():
            self._fixed[name] = self.on_device(value)
            self.binding.bind_ortvalue_input(name, self._fixed[name])

    def run(
        self,
        per_image: Mapping[str, np.ndarray],
        per_point: Mapping[str, np.ndarray] | None = None,
        fixed: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every output for all images (and points), in order; see the module docstring."""
        g = self.graph
        if fixed:
            self.bind_fixed(fixed)
        n = len(next(iter(per_image.values())))
        point_chunks = self._point_chunks(per_point or {})
        results: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start in range(0, n, g.images):
            real = min(g.images, n - start)
            for name, value in per_image.items():
                self.binding.bind_cpu_input(name, _padded(value[start : start + real], g.images))
            merged = self._run_points(point_chunks, real)
            for name in self.outputs:
                results[name].append(merged[name])
        return {name: np.concatenate(parts) for name, parts in results.items()}

    def _point_chunks(self, per_point: Mapping[str, np.ndarray]) -> list[tuple[int, dict]]:
        """[(real points, {name: OrtValue on the device})] per chunk of `graph.points`."""
        if not per_point:
            return [(self.graph.points, {})]
        total = len(next(iter(per_point.values())))
        size = self.graph.points
        chunks = []
        for start in range(0, total, size):
            real = min(size, total - start)
            values = {
                name: self.on_device(
                    _padded(value[start : start + real], size, self.graph.point_padding.get(name))
                )
                for name, value in per_point.items()
            }
            chunks.append((real, values))
        return chunks

    def _run_points(self, chunks: list[tuple[int, dict]], real_images: int) -> dict:
        g = self.graph
        merged: dict[str, np.ndarray] = {}
        for k, (real_points, values) in enumerate(chunks):
            for name, value in values.items():
                self.binding.bind_ortvalue_input(name, value)
            self.binding.clear_binding_outputs()
            for name in self.outputs:
                self.binding.bind_output(name, self.device)
            self.session.run_with_iobinding(self.binding)
            out = dict(zip(self.outputs, self.binding.copy_outputs_to_cpu(), strict=True))
            for name, value in out.items():
                value = value[:real_images]
                if name in g.per_point:
                    value = value[:, :real_points]
                    merged[name] = value if k == 0 else np.concatenate([merged[name], value], 1)
                elif name in g.summed:
                    merged[name] = value if k == 0 else merged[name] + value
                elif k == 0:
                    merged[name] = value
        return merged


def _padded(value: np.ndarray, size: int, fill: float | None = None) -> np.ndarray:
    """`value` [m, ...] grown to [size, ...] with `fill` (zeros by default)."""
    value = np.ascontiguousarray(value)
    if len(value) == size:
        return value
    pad = np.full((size - len(value), *value.shape[1:]), fill or 0, dtype=value.dtype)
    return np.concatenate([value, pad])
