"""The HTML report (index, a page per model, a page per image), built from the results folder."""

from .builder import SECTION_BUILDERS, ModelContext, Section, build_report
from .portable import crawl, report_zip

__all__ = ["SECTION_BUILDERS", "ModelContext", "Section", "build_report", "crawl", "report_zip"]
