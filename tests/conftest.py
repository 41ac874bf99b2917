"""Shared fixtures. `effnet_dir`: EfficientNet-Lite0 exported once per session (slow, torch)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def effnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with model.onnx and model.json of the pretrained EfficientNet-Lite0."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from cnnviz.export import export_model

    out = tmp_path_factory.mktemp("efficientnet-lite0")
    export_model("efficientnet-lite0", "efficientnet-lite0", out)
    return out
