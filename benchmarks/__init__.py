"""Benchmarks of imagebackend against the cheapest way to do the same job.

Run ``tox -e bench`` or ``python benchmarks/bench.py --help``.
"""
