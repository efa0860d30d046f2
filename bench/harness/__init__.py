"""The side-by-side benchmark harness: mailtwist against Postfix and Dovecot.

``python bench/compare.py`` sets each server up on loopback with a temporary
configuration and data directory, runs the same loads against each, round by
round (interleaved, because this kind of machine is noisy), and prints medians,
ranges and ratios. See docs/performance.md.
"""
