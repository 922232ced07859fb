"""Tools built on the pyturbo library (they use only its public API):

- `bench`: `python -m pyturbo.bench`, stock vs pipelined prefill measured in one run
- `synth`: random-weight GGUF models of real shapes, written once and cached (no download)
- `workers`: local llama.cpp RPC worker processes on 127.0.0.1 (`workers.local(n)`)
- `links`: RPC workers behind shaped network links on one machine (network namespaces, veth, tc; root only)
- `ttft`: `python -m pyturbo.tools.ttft`, time to first token through the server's HTTP API, pipeline forced and off
- `worker`: `python -m pyturbo.worker`, one RPC worker process (a device of a layer split) on this host
"""
