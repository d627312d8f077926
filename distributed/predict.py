"""``python -m distributed.predict --model=... --data=in.npz --out=pred.npz``: a trained model's
predictions (see `distributed.cli.predict`)."""

import sys

from distributed.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
