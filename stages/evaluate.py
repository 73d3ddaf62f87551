"""DVC stage: evaluate a benchmark's trained models (see `mamlbench evaluate --help`)."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "evaluate", *sys.argv[1:]]
    main()
