"""Makes the subject_tag filter installable by name (a twisted.plugin module
of the ``mailtwist.plugins`` package; this directory has no __init__.py)."""

from subject_tag import subject_tag

__all__ = ["subject_tag"]
