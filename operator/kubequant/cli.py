"""`kubequant`: run the pipeline locally, render what the operator would create, or run the operator.

    kubequant run -f qm.yaml --claim NAME=DIR     # quantize -> gate -> serve on this machine
    kubequant render -f qm.yaml [-n NAMESPACE]   # the children as YAML, for review and GitOps
    kubequant operator [-n NAMESPACE ... | -A]    # the kopf operator
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from kubequant import builders
from kubequant.spec import KIND, SpecError, load_documents, parse_manifest


class _Dumper(yaml.SafeDumper):
    """Block YAML without &anchors: shared sub-dicts are written out in full."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _print_problems(what: str, error: SpecError) -> None:
    """One problem on the line, several one per line."""
    if len(error.problems) == 1:
        print(f"{what}: {error.problems[0]}", file=sys.stderr)
    else:
        print(f"{what}: {len(error.problems)} problems", *(f"  - {p}" for p in error.problems), sep="\n", file=sys.stderr)


def _render(args: argparse.Namespace) -> int:
    docs = []
    try:
        for file in args.filename:
            docs += load_documents(file, sys.stdin.read() if file == "-" else None)
    except SpecError as exc:
        _print_problems("error", exc)
        return 2
    out = []
    for doc in docs:
        if doc.get("kind") != KIND:
            print(f"skipping {doc.get('kind')} {doc.get('metadata', {}).get('name')}: not a {KIND}", file=sys.stderr)
            continue
        doc.setdefault("metadata", {})
        doc["metadata"]["namespace"] = args.namespace or doc["metadata"].get("namespace") or "default"
        try:
            model = parse_manifest(doc)
        except SpecError as exc:
            _print_problems(f"{KIND} {doc['metadata'].get('name')}", exc)
            return 2
        out += builders.render(model)
    sys.stdout.write(yaml.dump_all(out, Dumper=_Dumper, sort_keys=False, default_flow_style=False))
    return 0


def _operator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from kubequant.handlers import OperatorSettings  # importing registers the handlers

    settings = OperatorSettings(metrics_port=args.metrics_port, bind_address=args.bind_address,
                                resync_seconds=args.resync_seconds, discovery=args.discovery)
    kopf.run(
        memo=kopf.Memo(settings=settings),
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=True,
        liveness_endpoint=f"http://{args.bind_address}:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from kubequant.local import LocalRun, LocalRunError, Stopped, parse_claims, run_local, stop_on_signals

    try:
        run = LocalRun(
            manifest=Path(args.filename), workdir=Path(args.workdir).resolve(), claims=parse_claims(args.claim),
            port=args.port, serve=not args.no_serve, serve_seconds=args.serve_seconds, engine=args.engine,
            device=args.device,
        )
        with stop_on_signals():
            return run_local(run)
    except Stopped as exc:
        print(f"stopped by {exc}; everything this run started has been stopped", file=sys.stderr)
        return 128 + exc.signum
    except SpecError as exc:
        _print_problems("error", exc)
        return 2
    except LocalRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubequant", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="quantize -> evaluate -> gate -> serve on this machine, from the same YAML")
    p.add_argument("-f", "--filename", required=True, help="a QuantizedModel YAML file")
    p.add_argument("--claim", action="append", default=[], metavar="NAME=DIR",
                   help="a PersistentVolumeClaim of the spec as a local directory; repeatable")
    p.add_argument("--workdir", default=".kubequant", help="artifacts and results (default: .kubequant)")
    p.add_argument("--port", type=int, default=8000, help="vLLM's port on 127.0.0.1")
    p.add_argument("--engine", choices=("vllm", "torch"), default="vllm", help="the gate's engine")
    p.add_argument("--device", default="auto", help="quantization device: auto, cpu, cuda")
    p.add_argument("--no-serve", action="store_true", help="stop after the gate")
    p.add_argument("--serve-seconds", type=float, help="serve this long, then stop (default: until Ctrl-C)")
    p.set_defaults(func=_run)

    p = sub.add_parser("render", help="print the objects the operator would create for QuantizedModels")
    p.add_argument("-f", "--filename", action="append", required=True, help="YAML file ('-' for stdin); repeatable")
    p.add_argument("-n", "--namespace", help="namespace of the objects (default: the resource's, else default)")
    p.set_defaults(func=_render)

    p = sub.add_parser("operator", help="run the operator (kopf)")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace; repeatable")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--health-port", type=int, default=8081, help="liveness /healthz port; 0 disables")
    p.add_argument("--resync-seconds", type=float, default=60, help="re-check every model this often")
    p.add_argument("--no-discovery", dest="discovery", action="store_false",
                   help="do not list or watch CRDs and Namespaces (for installs without that ClusterRole): "
                        "serve the given namespaces and the kinds the cluster has at start")
    p.add_argument("--bind-address", default="0.0.0.0",
                   help="address of the metrics and health endpoints (127.0.0.1: this machine only)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
