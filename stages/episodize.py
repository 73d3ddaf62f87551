"""DVC stage: write the fixed evaluation episodes of every setting in params (see `mamlbench data episodize --help`); args as the CLI's."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "data", "episodize", *sys.argv[1:]]
    main()
