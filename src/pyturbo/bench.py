"""`python -m pyturbo.bench`: the command; the benchmark itself is the package `pyturbo.tools.bench`."""
import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
