"""``python -m distributed.report WORKDIR``: plots and a summary of a run (see
`distributed.cli.report`)."""

import sys

from distributed.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
