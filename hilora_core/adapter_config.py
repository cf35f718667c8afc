"""What an adapter's ``adapter_config.json`` says: the one parser of it (engine and registry use it).

No torch here: the registry reads configs without loading the engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hilora_core.errors import AdapterLoadError

CONFIG_FILE = "adapter_config.json"
# LoraConfig fields that change the maths in a way this engine does not implement.
_REFUSED_FLAGS: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora=true)"),
    ("lora_bias", "a trained LoRA bias (lora_bias=true)"),
    ("fan_in_fan_out", "fan_in_fan_out=true (Conv1D layers)"),
    ("use_qalora", "QA-LoRA (use_qalora=true)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("layer_replication", "layer_replication"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("trainable_token_indices", "trainable_token_indices"),
    ("target_parameters", "LoRA on raw parameters such as fused MoE experts (target_parameters)"),
)

def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern keys: ``(.*\\.)?(pattern)$`` on the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that the engine uses."""

    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    base_model: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scaling(self, module: str, rank: int) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); alpha from ``alpha_pattern`` when it matches."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


MAX_CONFIG_BYTES = 1_000_000


def parse_adapter_config(raw: bytes | str, where: str) -> AdapterConfig:
    """Parse and check the text of an ``adapter_config.json`` (PEFT LoRA only): the one parser of it.

    ``where`` names the file in error messages. Refuses what the engine does not implement (DoRA,
    trained biases, ...), a non-integer or < 1 ``r``, a ``lora_alpha`` that is not a number > 0, and
    ``target_modules`` that are neither a name nor a list of names.
    """
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{where} is {len(raw)} bytes; an adapter config is at most {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(f"only LoRA adapters are supported, {where} has peft_type={peft_type!r}")
    for key, what in _REFUSED_FLAGS:
        if cfg.get(key):
            raise AdapterLoadError(f"{what} is not supported: {key}={cfg[key]!r} in {where}")
    if cfg.get("bias", "none") != "none":
        raise AdapterLoadError(f"bias-trained adapters are not supported: bias={cfg['bias']!r} in {where}")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterLoadError(f"{where}: r must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha > 0):
        raise AdapterLoadError(f"{where}: lora_alpha must be a number > 0, got {alpha!r}")
    targets = cfg.get("target_modules") or ()
    if not isinstance(targets, (str, list, tuple)) or (
            not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
        raise AdapterLoadError(f"{where}: target_modules must be a PEFT regex or a list of module names, "
                               f"got {targets!r}")
    base = cfg.get("base_model_name_or_path")
    return AdapterConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(set(targets))),
        base_model=base if isinstance(base, str) and base else None,
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
    )


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Read and check ``directory/adapter_config.json`` (:func:`parse_adapter_config`)."""
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{cfg_path} is missing: not a PEFT adapter folder")
    try:
        with open(cfg_path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterLoadError(f"cannot read {cfg_path}: {exc}") from exc
    return parse_adapter_config(raw, str(cfg_path))


