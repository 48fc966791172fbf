"""``python -m dynarch``: the same command-line tool as ``dynarch``."""

from dynarch.cli import main

if __name__ == "__main__":
    main()
