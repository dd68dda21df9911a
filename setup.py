"""Build the optional C helpers (hot path, writer inserts); poolscope works without them."""

import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

_AUTO_PTH = os.path.join("instrument", "_bootstrap", "poolscope-auto.pth")


class _BuildPyWithPth(build_py):
    """Also put ``poolscope-auto.pth`` at the top of the wheel, so that it is installed
    into site-packages: it turns auto-attach on in processes that have ``POOLSCOPE_AUTO=1``."""

    def run(self) -> None:
        super().run()
        self.copy_file(_AUTO_PTH, os.path.join(self.build_lib, os.path.basename(_AUTO_PTH)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        pth = os.path.join(self.build_lib, os.path.basename(_AUTO_PTH))
        return [*super().get_outputs(include_bytecode), pth]


setup(
    cmdclass={"build_py": _BuildPyWithPth},
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
    ],
)
