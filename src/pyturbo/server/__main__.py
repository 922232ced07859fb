"""`python -m pyturbo.server --model PATH.gguf [...]` or `python -m pyturbo.server --demo`; --help lists the options."""
from __future__ import annotations

import logging
import sys

from ..tools.worker import is_loopback


def main(argv: list[str] | None = None) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"error: the server needs its extra dependencies ({e.name} is missing): run pip install \".[server]\" in "
              "the pyturbo checkout", file=sys.stderr)
        return 1
    from .settings import parse_args

    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyturbo.llama").setLevel(logging.WARNING)  # llama.cpp's load chatter: warnings and errors only
    if not is_loopback(settings.host):
        logging.getLogger("pyturbo.server").warning(
            "listening on %s: reachable from other machines%s", settings.host,
            "" if settings.api_key else " without an --api-key")
    if settings.demo:
        print(f"pyturbo demo: a synthetic model with random weights (its answers are word salad) split over "
              f"{settings.demo_workers} local RPC workers. Open http://{settings.host}:{settings.port}/ once it says "
              f"'Uvicorn running'.", file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
