"""`python -m pyturbo.server`: an OpenAI-compatible HTTP server (completions, chat, a chat page) whose long prompts
prefill pipelined. Needs the `server` extra: `pip install ".[server]"`, run in the pyturbo checkout (an unrelated
project has the name pyturbo on the public package index)."""
