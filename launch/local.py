#!/usr/bin/env python3
"""Start N local processes of a command, each with M simulated CPU devices, wired together
(the program behind the ``jax-bcd-launch`` console script; see `distributed.cli.launch`)::

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        python -m distributed.train --workdir=runs/two_hosts
"""

import os
import sys

if __name__ == "__main__":
    try:
        from distributed.cli.launch import main
    except ImportError:  # run from a checkout without the package installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from distributed.cli.launch import main
    sys.exit(main())
