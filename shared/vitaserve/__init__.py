"""vitaserve: serving VITA-1.5-style real-time vision and speech models.

`vitaserve.models` is the model library (every stage of VITA-1.5, checkpoints, conformance);
`vitaserve.errors` is the one error hierarchy that every service maps to gRPC status codes.
"""

__version__ = "0.1.0"
