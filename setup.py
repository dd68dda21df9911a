"""Build the optional C helpers (hot path, writer inserts); poolscope works without them."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "instrument._speedups",
            ["instrument/_speedups.c"],
            depends=["instrument/_events_api.h", "instrument/_compat.h", "instrument/_record.h"],
            optional=True,
        ),
        Extension(
            "instrument._sqlite_rows",
            ["instrument/_sqlite_rows.c"],
            depends=["instrument/_events_api.h", "instrument/_compat.h", "instrument/_record.h"],
            optional=True,
        ),
    ]
)
