"""Ray Serve: `sdrt serve`'s batcher and FastAPI app as a deployment with replicas.

Each replica loads the bundles, runs one Batcher per bundle and serves `create_app` through
`@serve.ingress`, so the API, the metrics and the images are those of `sdrt serve`; Ray adds
replicas, placement (one GPU per replica on GPU clusters) and autoscaling. Every response names
its replica in the `x-sdrt-replica` header (Ray's replica id, which is also its actor name).

    sdrt serve BUNDLE --ray --replicas 2
    serve run sdrt.serve.ray:app bundle=BUNDLE replicas=2       # Ray's own CLI
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from ..errors import UserError
from ..lora_pool import DEFAULT_MAX_LORAS
from .batcher import DEFAULT_MAX_BATCH_ROWS, load_batchers
from .settings import Settings

REPLICA_HEADER = "x-sdrt-replica"
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica loads and how it batches (the same knobs as `sdrt serve`)."""

    bundles: tuple[str, ...]
    backend: str = "onnxruntime"
    device: str = "auto"
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    max_queue: int = 64
    batching: str = "continuous"
    request_timeout_s: float = 300.0
    settings: Settings = field(default_factory=Settings)
    trusted_key: str | None = None  # PEM public key every bundle must be signed by
    max_loras: int = DEFAULT_MAX_LORAS  # run-time LoRA pool per model


@serve.deployment(name="sdrt")
@serve.ingress()
class SdrtReplica:
    """One replica: a Batcher per bundle behind the `sdrt serve` FastAPI app."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.models = load_batchers(
            config.bundles,
            backend=config.backend,
            device=config.device,
            trusted_key=config.trusted_key,
            max_loras=config.max_loras,
            max_batch_rows=config.max_batch_rows,
            max_queue=config.max_queue,
            mode=config.batching,
            request_timeout_s=config.request_timeout_s,
        )
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(self.models, self.config.settings)
        replica_id = self.replica_id

        @app.middleware("http")
        async def name_the_replica(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica_id
            return response

        return app


def deployment_options(
    replicas: int | None = None,
    autoscaling: Mapping[str, Any] | None = None,
    gpu: bool = False,
    cpus_per_replica: float = 1.0,
    max_ongoing_requests: int = 64,
) -> dict[str, Any]:
    """Ray options: a fixed replica count or an autoscaling config; one GPU per replica on GPU
    clusters (the replica then sees that GPU as cuda:0), else `cpus_per_replica` CPUs."""
    if (replicas is None) == (autoscaling is None):
        raise UserError("give either a replica count or an autoscaling config, not both")
    actor = {"num_gpus": 1, "num_cpus": cpus_per_replica} if gpu else {"num_cpus": cpus_per_replica}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": max_ongoing_requests,
    }
    if replicas is not None:
        if replicas < 1:
            raise UserError(f"--replicas must be >= 1, got {replicas}")
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = autoscaling_config(autoscaling or {})
    return options


def autoscaling_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Ray's autoscaling_config from flags or a JSON file's object; unknown keys are refused."""
    unknown = sorted(set(values) - set(AUTOSCALING_KEYS))
    if unknown:
        raise UserError(
            f"unknown autoscaling setting {', '.join(unknown)}; use {', '.join(AUTOSCALING_KEYS)}"
        )
    low, high = int(values.get("min_replicas", 1)), int(values.get("max_replicas", 1))
    if not 0 <= low <= high or high < 1:
        raise UserError(
            f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
            f"got {low} and {high}"
        )
    target = float(values.get("target_ongoing_requests", 8))
    if target <= 0:
        raise UserError(f"target_ongoing_requests must be > 0, got {target}")
    return {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}


def read_autoscaling_file(path: str) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read autoscaling config {path} ({err}); give a JSON file") from err
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object with {', '.join(AUTOSCALING_KEYS)}")
    return values


def build(config: ReplicaConfig, options: Mapping[str, Any]) -> Any:
    """The Ray Serve application: `serve.run(build(...))`."""
    return SdrtReplica.options(**options).bind(config)


def app(args: dict[str, str]) -> Any:
    """Application builder for `serve run sdrt.serve.ray:app bundle=DIR [replicas=N]
    [min_replicas= max_replicas= target_ongoing_requests=] [device=] [backend=]
    [max_batch_rows=] [max_loras=] [trusted_key=PEM]`; GPUs are used when the cluster has
    them."""
    import ray

    args = dict(args)
    if "bundle" not in args:
        raise UserError("give bundle=DIR (several: bundle=A,B)")
    config = ReplicaConfig(
        bundles=tuple(args.pop("bundle").split(",")),
        backend=args.pop("backend", "onnxruntime"),
        device=args.pop("device", "auto"),
        max_batch_rows=int(args.pop("max_batch_rows", DEFAULT_MAX_BATCH_ROWS)),
        trusted_key=args.pop("trusted_key", None),
        max_loras=int(args.pop("max_loras", DEFAULT_MAX_LORAS)),
    )
    replicas = args.pop("replicas", None)
    scaling = {k: args.pop(k) for k in AUTOSCALING_KEYS if k in args}
    if args:
        raise UserError(f"unknown argument {', '.join(sorted(args))} for sdrt.serve.ray:app")
    gpu = config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    count = int(replicas) if replicas is not None else (None if scaling else 1)
    options = deployment_options(count, scaling or None, gpu=gpu)
    return build(config, options)
