"""``python -m instrument``: the same command line as ``poolscope``."""

from .cli import main

if __name__ == "__main__":
    main()
