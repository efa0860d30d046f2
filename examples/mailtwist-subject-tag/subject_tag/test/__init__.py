"""Tests of the subject_tag filter."""
