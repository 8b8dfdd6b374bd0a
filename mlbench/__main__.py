"""``python -m mlbench ...``: the ``mlbench`` command line, for an environment whose scripts are not on the PATH
(``golden bisect`` runs its checks this way, with each throw-away environment's own interpreter)."""

import sys

from mlbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
