"""vitaserve's OpenAI Realtime-compatible gateway: WebSocket `/v1/realtime` and a browser page at `/`, in
front of the orchestrator's Converse gRPC stream (session.py translates; app.py serves)."""
