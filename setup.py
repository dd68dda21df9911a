"""Build the optional C helper for the hot path; poolscope works without it (pure Python)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("instrument._speedups", ["instrument/_speedups.c"], optional=True),
    ]
)
