"""`python -m vitaserve_orchestrator.healthcheck [--service NAME]`: this pod's orchestrator's grpc.health.v1
status, over TLS when the server serves TLS; exit code 0 when SERVING, 1 otherwise (printed on stderr).

Kubernetes' native gRPC probes cannot speak TLS, so with `orchestrator.tls` the Helm chart runs this as an
exec probe instead (`--service liveness` for the liveness and startup probes, service "" for readiness). It
reads the server's own settings (the same environment): it connects to 127.0.0.1 on the port of
`VITASERVE_LISTEN_ADDRESS`, trusts `VITASERVE_TLS_PROBE_CA_FILE` (default: the server's certificate chain
itself) and checks the name `VITASERVE_TLS_PROBE_SERVER_NAME` on the certificate; under mTLS it presents
the server's own certificate and key as its client certificate (the client CA must have signed it).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve_orchestrator.settings import OrchestratorSettings


def channel_for(settings: OrchestratorSettings) -> grpc.Channel:
    port = settings.listen_address.rpartition(":")[2]
    target = f"127.0.0.1:{port}"
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return grpc.insecure_channel(target)
    roots = (settings.tls_probe_ca_file or settings.tls_cert_file).read_bytes()
    mtls = settings.tls_client_ca_file is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=settings.tls_key_file.read_bytes() if mtls else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if mtls else None,
    )
    return grpc.secure_channel(target, credentials,
                               options=[("grpc.ssl_target_name_override", settings.tls_probe_server_name)])


def check(settings: OrchestratorSettings, service: str, timeout_s: float) -> tuple[bool, str]:
    """(SERVING?, what was seen)."""
    with channel_for(settings) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n")[0])
    parser.add_argument("--service", default="", help='"" (ready: every model and not draining) or liveness')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    ok, seen = check(OrchestratorSettings(), args.service, args.timeout)
    if not ok:
        print(f"orchestrator health {args.service!r}: {seen}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
