"""Errors a user can act on: each names the thing, where it is, and what to do."""

from __future__ import annotations


class CnnvizError(Exception):
    """Base class: the message is meant for the person running cnnviz."""


class ImageError(CnnvizError):
    """An input image cannot be read or converted."""


class ModelError(CnnvizError):
    """A model cannot be exported, loaded or inspected."""


class ConfigError(CnnvizError):
    """A config value is wrong (an unknown layer, class or option)."""


class DeviceError(CnnvizError):
    """The requested device (e.g. cuda) is not usable here."""
