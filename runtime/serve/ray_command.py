"""`sdrt serve BUNDLE --ray`: the same server as replicas on a Ray cluster (sdrt[ray]).

Kept apart from sdrt.serve.ray so that `sdrt serve --help` does not import Ray.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from ..errors import UserError
from .settings import Settings


def add_arguments(serve: argparse.ArgumentParser) -> None:
    ray = serve.add_argument_group("Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas")
    ray.add_argument("--ray-address", help="cluster to join (default: $RAY_ADDRESS, else local)")
    ray.add_argument("--replicas", type=int, help="fixed replica count (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling lower bound")
    ray.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    ray.add_argument("--target-ongoing-requests", type=float, help="autoscaling target per replica")
    ray.add_argument("--autoscaling-config", metavar="JSON", help="file with the three above")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0)


def serve_on_ray(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import ray
        from ray import serve

        from . import ray as sdrt_ray
    except ImportError as err:
        raise UserError(
            f"--ray needs Ray Serve ({err.name} is missing); run `pip install 'sdrt[ray]'`"
        ) from err
    scaling = _autoscaling(args, sdrt_ray)
    config = sdrt_ray.ReplicaConfig(
        bundles=tuple(args.bundles),
        backend=args.backend,
        device=args.device,
        max_batch_rows=args.max_batch_rows,
        max_queue=args.max_queue,
        batching=args.batching,
        request_timeout_s=args.request_timeout,
        settings=settings,
        trusted_key=args.trusted_key,
        max_loras=args.max_loras,
    )
    ray.init(address=args.ray_address, include_dashboard=False)
    gpu = args.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    options = sdrt_ray.deployment_options(
        None if scaling else (args.replicas or 1),
        scaling,
        gpu=gpu,
        cpus_per_replica=args.cpus_per_replica,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(sdrt_ray.build(config, options), name="sdrt", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        print("sdrt: stopping Ray Serve", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _autoscaling(args: argparse.Namespace, sdrt_ray: Any) -> dict[str, Any] | None:
    values = (
        sdrt_ray.read_autoscaling_file(args.autoscaling_config) if args.autoscaling_config else {}
    )
    for key in sdrt_ray.AUTOSCALING_KEYS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if values and args.replicas is not None:
        raise UserError("give --replicas or autoscaling settings, not both")
    return values or None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
