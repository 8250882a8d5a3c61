"""``kuberlhf-operator``: run the kopf operator (standalone, namespaced or cluster-wide) with a liveness endpoint
and Prometheus metrics.

    kuberlhf-operator --namespace team-a --namespace team-b
    kuberlhf-operator --all-namespaces

The API server is reached in-cluster through the service account, else through $KUBECONFIG (~/.kube/config).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ENV_NAMESPACES = "KUBERLHF_NAMESPACES"  # comma-separated, used when no --namespace/--all-namespaces is given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kuberlhf-operator", description="Run the RLHFPipeline operator (kopf).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (cluster-wide)")
    p.add_argument("--liveness-port", type=int, default=int(os.environ.get("KUBERLHF_LIVENESS_PORT", "8080")),
                   help="serve GET /healthz on this port (0 = off; default 8080)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("KUBERLHF_METRICS_PORT", "9090")),
                   help="serve Prometheus /metrics on this port (0 = off; default 9090)")
    p.add_argument("--bind", default=os.environ.get("KUBERLHF_BIND", "0.0.0.0"), help="address of both endpoints")
    p.add_argument("--default-image", default=os.environ.get("KUBERLHF_DEFAULT_IMAGE"),
                   help="trainer image for pipelines without spec.image (env KUBERLHF_DEFAULT_IMAGE)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        env = [ns.strip() for ns in os.environ.get(ENV_NAMESPACES, "").split(",") if ns.strip()]
        if env:
            args.namespace = env
        else:
            p.error(f"give --namespace NS (repeatable), --all-namespaces, or set {ENV_NAMESPACES}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.default_image:
        os.environ["KUBERLHF_DEFAULT_IMAGE"] = args.default_image

    import kopf
    from prometheus_client import start_http_server

    from kuberlhf_operator import handlers  # noqa: F401 - registers the handlers with kopf's default registry
    from kuberlhf_operator.controller import Operator, workers
    from kuberlhf_operator.reconcile import config_from_env

    operator = Operator(config=config_from_env(os.environ),
                        namespaced=not args.all_namespaces,
                        safety_interval=float(os.environ.get("KUBERLHF_RECONCILE_INTERVAL", "60")),
                        apply_workers=workers())
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind)
    liveness = f"http://{args.bind}:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=() if args.all_namespaces else tuple(args.namespace),
        liveness_endpoint=liveness,
        memo=kopf.Memo(operator=operator),
    )


if __name__ == "__main__":
    main()
