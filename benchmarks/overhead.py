"""Stand-In's cost over the base Wan transformer: see standin/bench.py (also `standin bench`)."""

import sys

from standin.bench import main

if __name__ == "__main__":
    sys.exit(main())
