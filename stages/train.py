"""DVC stage: meta-train a benchmark's model (see `mamlbench train --help`); args as the CLI's."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "train", *sys.argv[1:], "--no-progress"]
    main()
