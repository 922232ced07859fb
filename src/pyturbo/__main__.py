"""`python -m pyturbo` lists the commands (it used to start the benchmark, which takes minutes, without a word)."""
import sys

from . import __version__

COMMANDS = f"""\
pyturbo {__version__}: pipelined long-prompt prefill for llama.cpp models split layer-wise over several devices.

Commands (each takes --help):
  python -m pyturbo.bench            stock llama.cpp vs the pipeline on a built-in model (minutes; --help says how long)
  python -m pyturbo.bench --quick    the same, short (under a minute on 2 cores)
  python -m pyturbo.server --demo    an OpenAI-compatible server on a synthetic model (--model PATH.gguf for yours)
  python -m pyturbo.worker --port N  a llama.cpp RPC worker (one device of a split) on this host
  python -m pytest tests             the tests, run in the pyturbo checkout after: pip install ".[test]"
"""


def main(argv: list[str]) -> int:
    if argv and argv[0] not in ("-h", "--help"):
        print(COMMANDS, file=sys.stderr)
        print(f"python -m pyturbo takes no arguments (got {' '.join(argv)}): run one of the commands above",
              file=sys.stderr)
        return 2
    print(COMMANDS, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
