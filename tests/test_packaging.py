"""What the wheel installs: one import package, ``instrument``, with the dashboard and the
demo's shop inside it; the package data it names exists. ``.ci/wheel-check`` builds the
wheel and runs it in a fresh venv; these checks read the configuration it is built from."""

from __future__ import annotations

from pathlib import Path

import pytest

import instrument
from instrument import _stacks

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the configuration is the same on 3.10

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package: str) -> Path:
    """The folder of the clone that holds ``package``, as setuptools maps it."""
    mapped = SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mapped:
            return ROOT / mapped[".".join(parts[:n])] / Path(*parts[n:])
    return ROOT / Path(*parts)


class TestWheelContents:
    """The packages and package data ``pyproject.toml`` gives the wheel."""

    def test_every_package_is_inside_instrument(self) -> None:
        """Nothing but ``instrument`` lands at the top of site-packages: no ``sample_app``,
        no ``dashboard``."""
        packages = SETUPTOOLS.get("packages")
        assert isinstance(packages, list), "packages must be listed, not found"
        assert {p.split(".")[0] for p in packages} == {"instrument"}
        assert {"instrument.dashboard", "instrument.sample_app"} <= set(packages)

    def test_every_folder_of_code_is_a_listed_package(self) -> None:
        """Each listed package has its folder, and every folder of Python files under them
        (the dashboard's pages included) is listed too, or shipped whole as package data
        (the launcher's ``_bootstrap/``), so the wheel leaves none out."""
        packages = set(SETUPTOOLS["packages"])
        package_data = SETUPTOOLS.get("package-data", {})
        for package in packages:
            folder = _folder(package)
            assert folder.is_dir(), f"{package}: no folder {folder}"
            as_data = {p.split("/")[0] for p in package_data.get(package, ()) if "/" in p}
            for sub in folder.iterdir():
                if sub.is_dir() and any(sub.glob("*.py")) and sub.name not in as_data:
                    assert f"{package}.{sub.name}" in packages, f"{sub} is not in the wheel"

    def test_package_data_names_only_what_exists(self) -> None:
        """Each package-data pattern matches at least one file of its package."""
        package_data = SETUPTOOLS.get("package-data", {})
        assert package_data, "the report's JSON schema is package data"
        for package, patterns in package_data.items():
            for pattern in patterns:
                matches = [p for p in _folder(package).glob(pattern) if p.is_file()]
                assert matches, f"package-data {package}: {pattern!r} matches no file"

    def test_the_clone_is_installed_under_the_same_names(self) -> None:
        """In a clone (an editable install), ``instrument.dashboard`` and
        ``instrument.sample_app`` are the top-level ``dashboard/`` and ``sample_app/``."""
        import instrument.dashboard
        import instrument.sample_app

        assert Path(instrument.__file__).parent == ROOT / "instrument"
        assert instrument.dashboard.APP == ROOT / "dashboard" / "app.py"
        assert Path(instrument.sample_app.__file__).parent == ROOT / "sample_app"


class TestInstalledShopSites:
    """Installed, the demo's shop lives inside poolscope's own folder."""

    def test_the_installed_shop_is_application_code(self) -> None:
        """Checkouts from ``instrument/sample_app/`` keep the shop's line as their site;
        the rest of ``instrument/`` is still poolscope's own frames."""
        package = Path(instrument.__file__).resolve().parent
        assert _stacks.is_application_file(str(package / "sample_app" / "bugs.py"))
        assert not _stacks.is_application_file(str(package / "_hooks.py"))
        assert not _stacks.is_application_file(str(package / "sample_app_helpers.py"))
