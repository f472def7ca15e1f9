"""Kubernetes-aware routing: where each component's Triton pods are (`discovery`), which pod serves a call
(`routing`: session affinity on a consistent-hash ring, round-robin otherwise), and `vitaserve cluster`
(`cli`) to look at both."""
