"""The settings: each declared once and embedded as it is, earlier configs' flat keys still read, a wrong key
refused by its path (no Ray, no Redis)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import PROJECT_ROOT, AppConfig
from hilora_core.engine.settings import EngineSettings, LoopSettings
from registry.config import PrefilterSettings, RegistryConfig, StoreSettings

ROOT = Path(__file__).resolve().parents[2]


def test_the_serve_configs_use_the_groups():
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)
    assert isinstance(cfg.model.engine, EngineSettings) and isinstance(cfg.model.loop, LoopSettings)
    assert cfg.model.engine.adapter_memory_bytes == 256 << 20 and cfg.model.loop.max_rows == 32
    assert cfg.registry.store.redis_url is None and cfg.registry.fit.eps is None
    assert AppConfig.model_validate(cfg.model_dump()) == cfg  # what the deployments receive


def test_flat_keys_of_earlier_configs_move_into_their_groups():
    old = {"model": {"max_slots": 3, "max_rows": 5, "prefill_tokens_per_step": 64, "scheduler": "continuous"},
           "registry": {"redis_url": "redis://h:1/0", "eps": 0.02, "prefilter_min_pool": 50, "store_fit_every": 7,
                        "max_target_modules": 9, "seed_manifest": None}}
    new = {"model": {"engine": {"max_slots": 3}, "loop": {"max_rows": 5, "prefill_tokens_per_step": 64}},
           "registry": {"store": {"redis_url": "redis://h:1/0"}, "fit": {"eps": 0.02}, "prefilter": {"min_pool": 50},
                        "scorer": {"store_fit_every": 7}, "admission": {"max_target_modules": 9},
                        "seed_manifest": None}}
    assert AppConfig.model_validate(old) == AppConfig.model_validate(new)


@pytest.mark.parametrize("args, names", [
    ({"model": {"scheduler": "static"}}, "static scheduler was removed"),
    ({"model": {"max_batch_size": 4}}, "model.max_batch_size"),
    ({"model": {"loop": {"max_rowz": 4}}}, "model.loop.max_rowz"),
    ({"model": {"max_rowz": 4}}, "model.max_rowz"),
    ({"model": {"loop": {"max_rows": 0}}}, "model.loop.max_rows"),
    ({"registry": {"store": {"redis": "x"}}}, "registry.store.redis"),
    ({"registry": {"prefilter": {"k": 64, "max_k": 8}}}, "max_k"),
    ({"registry": {"fit": {"criterion": "other"}}}, "registry.fit.criterion"),
    ({"registry": {"redis_url": "redis://a", "store": {"redis_url": "redis://b"}}}, "give it once"),
    ({"embedder": {"modle": "x"}}, "embedder.modle"),
])
def test_a_wrong_key_is_refused_by_name(args, names):
    with pytest.raises(ValidationError, match=names.replace(".", r"\.")):
        AppConfig.model_validate(args)


def test_the_registry_config_is_the_groups_as_they_are():
    cfg = AppConfig.model_validate({"model": {"engine": {"max_rank": 16}},
                                    "embedder": {"model": "m", "revision": "r1"},
                                    "registry": {"store": {"embedded_dir": "var/x"}, "adapter_dirs": ["pool"],
                                                 "prefilter": {"k": 4}}})
    rc = cfg.registry_config()
    assert rc.max_rank == 16 and rc.prefilter == PrefilterSettings(k=4) and rc.fit is cfg.registry.fit
    assert (rc.embedder.model, rc.embedder.revision) == ("m", "r1")
    assert rc.store.embedded_dir == str(PROJECT_ROOT / "var/x")
    assert rc.allowed_local_dirs == (str(PROJECT_ROOT / "pool"), str((PROJECT_ROOT / "examples/demo_pool").resolve()))


def test_a_registry_config_crosses_processes_as_plain_data():
    cfg = RegistryConfig(store=StoreSettings(redis_url="redis://h:1/0", key_prefix="p"), max_rank=8)
    assert RegistryConfig(**asdict(cfg)) == cfg
    with pytest.raises(ValidationError, match="key_prefix"):
        StoreSettings(key_prefix="ends:")
