"""``python -m distributed.train``: the command line (see `distributed.cli.train`)."""

from distributed.cli.train import entry

if __name__ == "__main__":
    entry()
