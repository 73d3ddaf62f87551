"""DVC stage: meta-train a benchmark's model (see `mamlbench train --help`); args as the CLI's.

Progress: a live bar on a terminal, a plain line every few percent or 30 s in a log.
"""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "train", *sys.argv[1:]]
    main()
