"""The step-slider page: every layer of a run held at one step, scrubbed through training.

:func:`write_view` writes the page's folder (``layerwatch view``),
:func:`view_html` the same page as one string (notebooks), :func:`follow_view`
keeps the folder current while training writes the run.
"""

from .page import default_view_dir, follow_view, view_html, write_view

__all__ = ["default_view_dir", "follow_view", "view_html", "write_view"]
