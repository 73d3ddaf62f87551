"""DVC stage: meta-train MAML-TRPO and the pretrained baseline on one environment.

Arguments as `mamlbench rl train --help` (paths come from dvc.yaml). Progress: a live bar on a
terminal, a plain line every few percent or 30 s in a log.
"""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "rl", "train", *sys.argv[1:]]
    main()
