"""`python -m pyturbo.server`: an OpenAI-compatible HTTP server (completions, chat, a chat page) whose long prompts
prefill pipelined. Needs the `server` extra: pip install "pyturbo[server]"."""
