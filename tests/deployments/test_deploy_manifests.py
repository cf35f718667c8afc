"""The deployment artefacts under deploy/ are valid: the RayService's serveConfigV2 passes Ray's own Serve
config schema and the application's config, and equals serve_config.gpu.yaml; the pods get their secrets;
Redis persists with AOF; the image pins what the project pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SECRETS = {"REDIS_URL", "HILORA_ADMIN_TOKEN", "HF_TOKEN"}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == "RayService" and docs[0]["apiVersion"] == "ray.io/v1"
    return docs[0]


def test_serve_config_passes_rays_schema_and_the_apps_config(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import DEPLOYMENT_DEFAULTS
    from deployments.config import AppConfig

    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)  # Ray's own check of a `serve deploy` file
    assert serve_config == yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    AppConfig.model_validate(app.args)  # the application accepts its args (unknown keys are refused)
    names = {d.name for d in app.deployments}
    assert names == set(DEPLOYMENT_DEFAULTS)
    model = next(d for d in app.deployments if d.name == "LoRAModel")
    options = model.model_dump(exclude_unset=True)
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["autoscaling_config"]["max_replicas"] > 1
    assert "pip" not in (app.runtime_env or {})  # the package comes with the image, not from an index


def test_cluster_shape_and_secrets(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _pinned("ray\\[serve\\]")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    (gpu,) = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["maxReplicas"] > gpu["minReplicas"]
    secret_name = worker["envFrom"][0]["secretRef"]["name"]
    for container in (head["template"]["spec"]["containers"][0], worker):
        assert container["envFrom"] == [{"secretRef": {"name": secret_name}}]
    example = yaml.safe_load((DEPLOY / "secrets.example.yaml").read_text())
    assert example["metadata"]["name"] == secret_name and set(example["stringData"]) == SECRETS


def test_redis_persists_with_aof():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "redis.yaml").read_text())}
    container = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] in (
        "always", "everysec")
    assert docs["StatefulSet"]["spec"]["volumeClaimTemplates"] and docs["Service"]["spec"]["ports"][0]["port"] == 6379
    url = yaml.safe_load((DEPLOY / "secrets.example.yaml").read_text())["stringData"]["REDIS_URL"]
    assert docs["Service"]["metadata"]["name"] in url


def test_image_pins_what_the_project_pins():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ray = _pinned("ray\\[serve\\]")
    assert f"rayproject/ray:{ray}-" in dockerfile
    torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"TORCH_VERSION={torch}" in dockerfile
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile  # the CUDA variant brings faiss-gpu


def _pinned(package_regex: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(package_regex + r"==([\d.]+)", text).group(1)


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_serve_run_can_build_the_app_from_the_config(name):
    """What `serve run <file>` does before any deployment starts: import the builder and call it the way
    Ray does (exactly one parameter, the file's args). A builder with a second parameter fails here."""
    import importlib

    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (app,) = yaml.safe_load((ROOT / name).read_text())["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app.get("args") or {}), Application)
