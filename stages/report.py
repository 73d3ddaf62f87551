"""DVC stage: reports/README.md and its figures from the metrics files (see `mamlbench report --help`)."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "report", *sys.argv[1:]]
    main()
