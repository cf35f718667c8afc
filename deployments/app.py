"""The application graph: ``Ingress(Embedder, RegistryService, LoRAModel)``.

``serve run serve_config.yaml`` imports :func:`build_app` and passes the
config's ``args`` (validated as :class:`deployments.config.AppConfig`).
Deployment options (replicas, autoscaling, resources) come from the YAML's
``deployments`` section; the defaults here fit a 2-core CPU machine.
"""

from __future__ import annotations

from ray.serve import Application

from .config import AppConfig
from .embedder import Embedder
from .ingress import Ingress
from .model import LoRAModel
from .registry_deployment import RegistryService


def build_app(args: dict | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    config = cfg.model_dump()
    small = {"num_cpus": 0.1}
    return Ingress.options(ray_actor_options=small).bind(
        Embedder.options(ray_actor_options={"num_cpus": 0.2}).bind(config),
        RegistryService.options(ray_actor_options=small).bind(config),
        LoRAModel.options(ray_actor_options={"num_cpus": 1}).bind(config),
        config,
    )
