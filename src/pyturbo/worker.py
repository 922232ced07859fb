"""`python -m pyturbo.worker`: the command; the worker itself is `pyturbo.tools.worker`."""
import sys

from .tools.worker import main

if __name__ == "__main__":
    sys.exit(main())
