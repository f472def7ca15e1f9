"""The four model components (vision encoder, audio encoder, LLM decoder, speech synthesis).

- `base`      the async interface the orchestrator and batch worker call (`ComponentClient`) and its types
- `engines`   the component logic itself, run inside the Triton models and by the in-process client
- `tensors`   Triton tensor names, dtypes and shapes, declared once for the models and their clients
- `triton`    the Triton implementation of the interface (tritonclient gRPC aio, streaming, cancellation)
- `inprocess` the in-process implementation (unit tests, environments without Triton)
"""
