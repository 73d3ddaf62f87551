"""DVC stage: tune a few-shot cell's inner loop with Optuna (see `mamlbench tune --help`)."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "tune", *sys.argv[1:]]
    main()
