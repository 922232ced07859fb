"""`python -m pyturbo` runs the benchmark (the package's main job)."""
import sys

from .bench import main

sys.exit(main())
