"""poolscope run: attach every SQLAlchemy engine of this process, after the program's own
``sitecustomize`` (if its environment has one) has run.

``poolscope run`` puts this file's directory first on ``PYTHONPATH``, so that Python
imports it at start-up in place of any other ``sitecustomize``. That one is imported
here, with this directory left out of ``sys.path`` while it is found, and stays in
``sys.modules`` under its name. Its errors are reported as Python itself reports them.
"""

import os
import sys


def _run_next_sitecustomize():
    here = os.path.dirname(os.path.realpath(__file__))
    ours = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    try:
        import sitecustomize  # noqa: F401  the program's own, if any
    except ImportError as exc:
        if exc.name != "sitecustomize":
            _report(exc)
    except Exception as exc:
        _report(exc)
    finally:
        sys.path[:] = saved
        if "sitecustomize" not in sys.modules and ours is not None:
            sys.modules["sitecustomize"] = ours


def _report(exc):
    # What site.execsitecustomize() prints for a sitecustomize that fails.
    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:
        sys.stderr.write(
            "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
            + exc.__class__.__name__
            + ": "
            + str(exc)
            + "\n"
        )


def _install():
    try:
        from instrument._auto import install
    except Exception:  # not poolscope's Python (another interpreter of CMD's): do nothing
        return
    install()


_run_next_sitecustomize()
_install()
