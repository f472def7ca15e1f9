"""The orchestrator service: sessions, turns, streaming and interruption over the Converse gRPC API."""
