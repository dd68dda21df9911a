"""Run SQLAlchemy's own pool, engine, session and asyncio tests with poolscope attached.

``make test-sqlalchemy`` runs this script. It takes the sdist of the SQLAlchemy
installed in this interpreter (downloaded once into ``.cache/sqlalchemy/``), then runs,
side by side, each in its own copy of the sdist's ``test/`` directory:

- the five test files without poolscope, and with a monitor attached to every pool
  (``poolscope_attach.py`` beside this script); any test whose outcome differs between
  the two runs fails the target, with the difference printed;
- ``test/engine/test_pool.py`` with ``--pool-leaks``: the target fails if fewer than
  1,000 checkouts are watched. The tests it flags are listed.

Run with ``python -s`` so the suite imports the installed SQLAlchemy, not the sdist's
``lib/``: ``python -s tests/sqlalchemy_suite/run.py``. Exit code 0 when nothing
differs, 1 otherwise, 2 when the suite cannot be fetched or run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = REPO / ".cache" / "sqlalchemy"

SYNC_FILES = (
    "test/engine/test_pool.py",
    "test/engine/test_reconnect.py",
    "test/engine/test_execute.py",
    "test/orm/test_session.py",
)
ASYNC_FILES = ("test/ext/asyncio/test_engine.py",)
MIN_WATCHED = 1000
TIMEOUT_S = 600


@dataclass
class Run:
    """One pytest run of the suite, in its own directory."""

    name: str
    files: tuple[str, ...]
    db: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    elapsed: float = 0.0

    def workdir(self) -> Path:
        return CACHE / "runs" / self.name

    @property
    def junit(self) -> Path:
        return self.workdir() / "junit.xml"

    @property
    def log(self) -> Path:
        return self.workdir() / "pytest.log"


def fail(message: str) -> None:
    print(f"test-sqlalchemy: {message}", file=sys.stderr)
    sys.exit(2)


def installed_version() -> str:
    import sqlalchemy

    if not sys.flags.no_user_site:
        fail("run me with `python -s`, so the suite imports the installed SQLAlchemy")
    return sqlalchemy.__version__


def sdist_tree(version: str) -> Path:
    """Download (once) and unpack (once) the sdist of SQLAlchemy ``version``."""
    tree = CACHE / f"sqlalchemy-{version}"
    if (tree / "test" / "conftest.py").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"sqlalchemy-{version}.tar.gz"
    if not archive.exists():
        print(f"test-sqlalchemy: downloading the sdist of SQLAlchemy {version}", flush=True)
        # --no-binary names SQLAlchemy alone: its build requirements may come as wheels
        # (pip prepares the sdist's metadata; building them from source takes minutes).
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        command += ["--no-binary", "sqlalchemy", "-d", str(CACHE), f"sqlalchemy=={version}"]
        if subprocess.run(command).returncode != 0 or not archive.exists():
            fail(f"could not download the sdist of SQLAlchemy {version}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(Path(tmp) / f"sqlalchemy-{version}", tree)
    return tree


def prepare(run: Run, tree: Path) -> None:
    """Give ``run`` a fresh directory: its own ``test/`` (files the tests write stay apart)."""
    work = run.workdir()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(tree / "test", work / "test", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(tree / name, work / name)
    (work / "lib").symlink_to(tree / "lib")  # test/conftest.py loads the plugin from there


def start(run: Run) -> None:
    command = [sys.executable, "-s", "-m", "pytest", *run.files, "--db", run.db]
    command += ["-p", "no:cacheprovider", f"--junitxml={run.junit}", "-o", "junit_family=xunit2"]
    command += list(run.args)
    env = dict(os.environ, **run.env)
    env.pop("PYTEST_ADDOPTS", None)
    with open(run.log, "wb") as log:
        run.proc = subprocess.Popen(
            command, cwd=run.workdir(), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    run.started = time.monotonic()


def wait(run: Run) -> None:
    assert run.proc is not None
    try:
        run.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - run.started)))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        fail(f"{run.name}: still running after {TIMEOUT_S} s (log: {run.log})")
    run.elapsed = time.monotonic() - run.started
    if run.proc.returncode not in (0, 1) or not run.junit.exists():
        tail = run.log.read_text(errors="replace").splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        fail(f"{run.name}: pytest exited with {run.proc.returncode} (log: {run.log})")


def outcomes(run: Run) -> dict[str, tuple[str, str]]:
    """Each test's outcome from the JUnit XML: ``{test: (outcome, first line of message)}``.

    A test whose call passed but whose teardown errored is ``error``; a skip says
    whether it was an expected failure.
    """
    result: dict[str, tuple[str, str]] = {}
    rank = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}
    for case in ET.parse(run.junit).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind = {"failure": "failed"}.get(child.tag, child.tag)
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    kind = "xfailed"
                if rank[kind] >= rank[outcome]:
                    outcome = kind
                    message = (child.get("message") or "").strip().splitlines()[:1]
                    message = message[0][:160] if message else ""
        previous = result.get(test)
        if previous is None or rank[outcome] > rank[previous[0]]:
            result[test] = (outcome, message)
    return result


def differing(plain: Run, attached: Run) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
    """The tests whose outcome differs: ``{test: (outcome without, outcome with)}``."""
    before, after = outcomes(plain), outcomes(attached)
    missing = ("not run", "")
    return {
        test: (before.get(test, missing), after.get(test, missing))
        for test in sorted(set(before) | set(after))
        if before.get(test, missing)[0] != after.get(test, missing)[0]
    }


def describe(diff: dict[str, tuple[tuple[str, str], tuple[str, str]]]) -> str:
    lines = []
    for test, (was, now) in diff.items():
        lines.append(f"  {test}: {was[0]} without poolscope, {now[0]} with it")
        for label, (outcome, message) in (("without", was), ("with", now)):
            if message and outcome not in ("passed", "not run"):
                lines.append(f"      {label}: {message}")
    return "\n".join(lines)


def node_id(test: str, files: tuple[str, ...]) -> str:
    """``test.engine.test_pool.PoolTest::t`` -> ``test/engine/test_pool.py::PoolTest::t``."""
    for path in files:
        module = path[: -len(".py")].replace("/", ".") + "."
        if test.startswith(module):
            return f"{path}::{test[len(module) :]}"
    return test


def counts(run: Run) -> str:
    tally: dict[str, int] = {}
    for outcome, _ in outcomes(run).values():
        tally[outcome] = tally.get(outcome, 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items()))


def summary_line(run: Run, pattern: str) -> re.Match[str] | None:
    """The last line of the run's output that ``pattern`` matches from its start."""
    found = None
    for line in run.log.read_text(errors="replace").splitlines():
        found = re.match(pattern, line) or found
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--show-flagged",
        type=int,
        default=10,
        metavar="N",
        help="list at most N of the tests --pool-leaks flags (default 10)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="install the attach plugin's hooks but attach no monitor: checks that the "
        "harness alone changes no outcome",
    )
    options = parser.parse_args(argv)
    begun = time.monotonic()
    version = installed_version()
    tree = sdist_tree(version)
    store_env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    }
    attach = ("-p", "no:poolscope", "-p", "poolscope_attach")
    runs = {
        "sync-plain": Run("sync-plain", SYNC_FILES, "sqlite", ("-p", "no:poolscope")),
        "sync-attached": Run("sync-attached", SYNC_FILES, "sqlite", attach, dict(store_env)),
        "async-plain": Run("async-plain", ASYNC_FILES, "aiosqlite", ("-p", "no:poolscope")),
        "async-attached": Run("async-attached", ASYNC_FILES, "aiosqlite", attach, dict(store_env)),
        "pool-leaks": Run("pool-leaks", SYNC_FILES[:1], "sqlite", ("--pool-leaks",)),
    }
    for run in runs.values():
        prepare(run, tree)
        if "attached" in run.name:
            run.env["POOLSCOPE_SUITE_STORE"] = str(run.workdir() / "poolscope.db")
            if options.dry_run:
                run.env["POOLSCOPE_SUITE_DRY_RUN"] = "1"
    print(
        f"test-sqlalchemy: SQLAlchemy {version}'s suite, {len(runs)} runs side by side "
        f"(logs in {CACHE.relative_to(REPO)}/runs/)",
        flush=True,
    )
    for run in runs.values():
        start(run)
    for run in runs.values():
        wait(run)
        print(f"  {run.name:15} {run.elapsed:5.1f} s  {counts(run)}", flush=True)

    problems = 0
    for kind in ("sync", "async"):
        plain, attached = runs[f"{kind}-plain"], runs[f"{kind}-attached"]
        match = summary_line(attached, r"poolscope-attach: (\d+) pools attached, (\d+) checkouts")
        print(f"{attached.name}: {match.string if match else 'no summary from poolscope_attach'}")
        pools, checkouts = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not pools or not (checkouts or options.dry_run):
            print(f"FAIL {attached.name}: no pool was attached or no checkout recorded")
            problems += 1
        diff = differing(plain, attached)
        if not diff:
            how = "the attach plugin (dry run)" if options.dry_run else "poolscope attached"
            print(f"ok   {kind}: every outcome is the same with {how}")
            continue
        # Timing-sensitive tests can flake on a loaded machine: rerun the differing
        # tests both ways; a difference that does not come back is listed, not failed.
        nodes = tuple(node_id(test, plain.files) for test in diff)
        again = [
            replace(r, name=f"{r.name}-again", files=nodes, env=dict(r.env))
            for r in (plain, attached)
        ]
        for run in again:
            prepare(run, tree)
            if "attached" in run.name:
                run.env["POOLSCOPE_SUITE_STORE"] = str(run.workdir() / "poolscope.db")
            start(run)
        for run in again:
            wait(run)
        # A test the rerun did not find (an id this script could not rebuild) counts as
        # differing: it fails rather than hides.
        before, after = outcomes(again[0]), outcomes(again[1])
        twice, once = {}, {}
        for test in diff:
            if test in before and test in after and before[test][0] == after[test][0]:
                once[test] = diff[test]
            else:
                twice[test] = diff[test]
        if twice:
            print(f"FAIL {kind}: {len(twice)} tests differ with poolscope attached (twice):")
            print(describe(twice))
            problems += 1
        if once:
            print(f"warn {kind}: {len(once)} tests differed once, not when rerun:")
            print(describe(once))

    leaks = runs["pool-leaks"]
    match = summary_line(leaks, r"poolscope: (\d+) pooled connection checkouts? watched")
    line = match.string if match else "no summary line from --pool-leaks"
    watched = int(match.group(1)) if match else 0
    flagged = sorted(
        re.findall(r"ERROR at teardown of (\S+)", leaks.log.read_text(errors="replace"))
    )
    if watched < MIN_WATCHED:
        print(f"FAIL pool-leaks: {watched} checkouts watched, fewer than {MIN_WATCHED} ({line!r})")
        problems += 1
    else:
        print(f"ok   pool-leaks: {line}")
    if flagged:
        # One line per test function (parametrized variants together), to show variety.
        functions: dict[str, int] = {}
        for name in flagged:
            functions[name.split("[")[0]] = functions.get(name.split("[")[0], 0) + 1
        shown = list(functions.items())[: options.show_flagged]
        print(f"     {len(flagged)} tests ({len(functions)} functions) flagged as leaking, e.g.:")
        print(
            "\n".join(f"       {name} (x{n})" if n > 1 else f"       {name}" for name, n in shown)
        )
    print(f"test-sqlalchemy: {time.monotonic() - begun:.0f} s", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
