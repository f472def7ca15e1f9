"""Everything that touches NVIDIA Triton Inference Server.

`vitaserve.triton.launcher` starts and stops a local `tritonserver` (the binary bundled in the
`nvidia-pytriton` wheel) whose Python-backend model stubs run in the project's venv; it is also the CLI
`python -m vitaserve.triton.launcher`. The package imports nothing eagerly, so `model.py` files and the
CLI load only what they use.
"""
