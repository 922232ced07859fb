"""`python -m pyturbo.bench`: the command; the benchmark itself is `pyturbo.tools.bench`."""
import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
