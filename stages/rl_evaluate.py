"""DVC stage: adaptation returns after 0..3 inner steps on fixed test tasks, with plots.

Arguments as `mamlbench rl evaluate --help` (paths come from dvc.yaml).
"""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "rl", "evaluate", *sys.argv[1:]]
    main()
