"""DVC stage: decode the raw data into data/prepared/<dataset>/{images.npy,meta.json} (see `mamlbench data prepare --help`); args as the CLI's."""
import sys

from mamlbench.cli import main

if __name__ == "__main__":
    sys.argv = ["mamlbench", "data", "prepare", *sys.argv[1:]]
    main()
