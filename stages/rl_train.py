"""DVC stage: meta-train MAML-TRPO and the pretrained baseline on one environment.

Arguments as `mamlbench rl train --help` (paths come from dvc.yaml); no progress bar in logs.
"""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "rl", "train", *sys.argv[1:], "--no-progress"]
    main()
