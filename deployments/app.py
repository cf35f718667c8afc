"""The application graph: ``Ingress(Embedder, RegistryService, LoRAModel)``.

``serve run serve_config.yaml`` imports :func:`build_app` and passes the
config's ``args`` (validated as :class:`deployments.config.AppConfig`).
Deployment options: :data:`DEPLOYMENT_DEFAULTS` is the one place their defaults are written
(sized for a 2-core CPU machine); a YAML's ``deployments`` section overrides any of them and adds
autoscaling (``serve_config.yaml``, ``serve_config.gpu.yaml``).
"""

from __future__ import annotations

from ray.serve import Application, Deployment

from .config import AppConfig
from .embedder import Embedder
from .ingress import Ingress
from .model import LoRAModel
from .registry_deployment import RegistryService

# Every queue is bounded: a model replica takes up to max_rows running plus max_waiting queued requests
# (its own admission control answers 503 beyond that), and each caller queues at most max_queued_requests
# more before Serve answers 503 itself.
DEPLOYMENT_DEFAULTS: dict[str, dict] = {
    "Ingress": {"max_ongoing_requests": 128, "max_queued_requests": 256, "ray_actor_options": {"num_cpus": 0.1}},
    "Embedder": {"max_ongoing_requests": 64, "max_queued_requests": 256, "ray_actor_options": {"num_cpus": 0.2}},
    "RegistryService": {"max_ongoing_requests": 64, "max_queued_requests": 256,
                        "ray_actor_options": {"num_cpus": 0.1}},
    "LoRAModel": {"max_ongoing_requests": 96, "max_queued_requests": 32, "ray_actor_options": {"num_cpus": 1}},
}


def _deployment(target: object) -> Deployment:
    """A deployment this package defines, as one: ray annotates ``serve.deployment(cls)`` as returning a
    decorator, so the type checker cannot see that these module attributes are deployments."""
    if not isinstance(target, Deployment):
        raise TypeError(f"{target!r} is not a Serve deployment")
    return target


def build_app(args: dict) -> Application:
    """The application graph for the validated ``args`` (:class:`AppConfig`): the entry point of
    ``serve_config.yaml`` (``import_path: deployments.app:build_app``). Ray Serve calls a builder with
    exactly one parameter, the YAML's ``args``; the YAML's ``deployments`` section sets Serve options."""
    return compose_app(args)


def compose_app(args: dict | None = None, deployments: dict[str, dict] | None = None) -> Application:
    """:func:`build_app` from Python, with ``deployments`` overriding Serve options per deployment name
    as a YAML's ``deployments`` section does (e.g. ``{"LoRAModel": {"num_replicas": 2}}``)."""
    cfg = AppConfig.model_validate(args or {})
    config = cfg.model_dump()
    d = {name: dict(opts) for name, opts in DEPLOYMENT_DEFAULTS.items()}
    # the replica's own bound: running rows plus its queue
    d["LoRAModel"]["max_ongoing_requests"] = cfg.model.loop.max_rows + cfg.model.loop.max_waiting
    for name, options in (deployments or {}).items():
        if name not in d:
            raise ValueError(f"unknown deployment {name!r}; the deployments are {sorted(d)}")
        d[name].update(options)
    return _deployment(Ingress).options(**d["Ingress"]).bind(
        _deployment(Embedder).options(**d["Embedder"]).bind(config),
        _deployment(RegistryService).options(**d["RegistryService"]).bind(config),
        _deployment(LoRAModel).options(**d["LoRAModel"]).bind(config),
        config,
    )
