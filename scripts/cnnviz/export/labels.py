"""Class names: ImageNet's from torchvision's weights metadata (offline), or the user's own."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names as torchvision ships them (no download needed)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_labels(spec: list[str] | str | Path, where: str) -> list[str]:
    """Labels from a list, or from a text file with one name per line (blank lines ignored)."""
    if isinstance(spec, list | tuple):
        labels = [str(x) for x in spec]
    else:
        path = Path(spec).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read the labels file {path} ({exc.strerror or exc}); "
                "give a text file with one class name per line, or a list"
            ) from exc
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"{where}: the labels are empty; give one class name per class")
    return labels


def default_labels(num_classes: int) -> list[str]:
    return [f"class {i}" for i in range(num_classes)]


def check_count(labels: list[str], num_classes: int, where: str) -> list[str]:
    if len(labels) != num_classes:
        raise ConfigError(
            f"{where}: {len(labels)} labels for a model with {num_classes} output classes; "
            "give exactly one name per class"
        )
    return labels
