"""The HTML report (index + one page per model), built from the results folder."""

from .builder import SECTION_BUILDERS, Section, build_report

__all__ = ["SECTION_BUILDERS", "Section", "build_report"]
