"""DVC stage: fetch, verify and extract (Omniglot) or locate (mini-ImageNet) the raw data (see `mamlbench data download --help`); args as the CLI's."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "data", "download", *sys.argv[1:]]
    main()
