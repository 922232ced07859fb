"""`python -m pyturbo` runs the benchmark (the package's main job)."""
import sys

from .tools.bench import main

sys.exit(main())
