"""The model families the engine serves, and each one's attention layout (which layers slide, how far).

A family is a transformers ``model_type`` whose decoder the engine runs exactly as PEFT does: its
adapted projections are ``nn.Linear`` inside ``model.layers.N`` and its attention reads the 4-D mask
the generation loop's KV memory builds (``kv_slots.py``). Each family here passes every check of
``tests/engine/test_model_families.py`` (logits and greedy generation against PEFT through the loop,
the token rule against its looped reference, seeded text alone and in a batch).

To add a family: add it to :data:`FAMILIES`, add its tiny config to ``tests/engine/family_models.py``
and run that test module. If its decoder takes one attention mask for all layers but some layers
slide and others do not, it cannot be served until it reads a ``{layer type: mask}`` mapping.

No torch here: ``hilora check-model`` reads configs without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hilora_core.errors import UnsupportedModelError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """One served family.

    Attributes:
        model_type: the transformers config's ``model_type``.
        architecture: its ``*ForCausalLM`` class name.
        masks_by_layer_type: the decoder reads ``attention_mask`` as ``{layer type: 4-D mask}``, so sliding
            and full layers can be mixed (Gemma 2 / 3, Qwen2 / 3); otherwise one mask serves every layer.
        features: what it exercises beyond Llama (for the support matrix).
    """

    model_type: str
    architecture: str
    masks_by_layer_type: bool = False
    features: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM"),
    Family("mistral", "MistralForCausalLM", features=("sliding window",)),
    Family("qwen2", "Qwen2ForCausalLM", True, ("attention bias", "sliding layers (max_window_layers)")),
    Family("qwen3", "Qwen3ForCausalLM", True, ("q/k norm", "sliding layers (max_window_layers)")),
    Family("gemma", "GemmaForCausalLM", features=("embedding multiplier",)),
    Family("gemma2", "Gemma2ForCausalLM", True, ("sliding and full layers", "logit soft-capping")),
    Family("gemma3_text", "Gemma3ForCausalLM", True, ("sliding and full layers", "q/k norm", "local rope")),
    Family("phi3", "Phi3ForCausalLM", features=("fused qkv_proj / gate_up_proj", "sliding window")),
    Family("granite", "GraniteForCausalLM", features=("embedding / residual / logit multipliers",)),
    Family("olmo2", "Olmo2ForCausalLM", features=("q/k norm",)),
    Family("starcoder2", "Starcoder2ForCausalLM", features=("sliding window", "biases", "c_fc / c_proj MLP")),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", features=("MoE: LoRA on attention",)),
    Family("mixtral", "MixtralForCausalLM", features=("MoE: LoRA on attention", "sliding window")),
)}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.architecture for f in FAMILIES.values())
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family_of(config) -> Family:
    """The served :class:`Family` of a transformers config, else :class:`UnsupportedModelError` naming it and
    listing the supported families."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    family = FAMILIES.get(str(model_type))
    if family is None:
        family = next((_BY_ARCHITECTURE[a] for a in archs if a in _BY_ARCHITECTURE), None)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported base model family {model_type!r} (architectures {archs}); served families: "
            f"{', '.join(sorted(FAMILIES))}. See hilora_core/engine/families.py for how to add one.")
    return family


def check_architecture(config) -> str:
    """The served architecture name of ``config`` (:func:`family_of`)."""
    return family_of(config).architecture


@dataclass(frozen=True)
class AttentionLayout:
    """Which decoder layers attend to a sliding window of the last ``window`` positions.

    Attributes:
        layer_types: per decoder layer, ``"full_attention"`` or ``"sliding_attention"``.
        window: a sliding layer's query at position p sees keys at positions > p - window (None: no layer slides).
        by_layer_type: the decoder takes one mask per layer type (see :class:`Family`).
    """

    layer_types: tuple[str, ...]
    window: int | None
    by_layer_type: bool

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct layer types, in first-use order."""
        return tuple(dict.fromkeys(self.layer_types))

    def window_of(self, layer_type: str) -> int | None:
        return self.window if layer_type == SLIDING else None


def attention_layout(config) -> AttentionLayout:
    """The :class:`AttentionLayout` of a served model's config, as its decoder applies it.

    ``config.layer_types`` when present (Gemma 2 / 3, Qwen2 / 3 with ``use_sliding_window``); else every
    layer slides when ``config.sliding_window`` is set (Mistral, Phi-3, Starcoder2, Mixtral). A decoder
    that mixes sliding and full layers but takes one mask is refused (it cannot be run exactly here)."""
    family = family_of(config)
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        types = [SLIDING if window else FULL] * n
    if len(types) != n or any(t not in (FULL, SLIDING) for t in types):
        raise UnsupportedModelError(f"{family.model_type}: layer_types {types} is not one of "
                                    f"{FULL!r} / {SLIDING!r} per layer ({n} layers)")
    if SLIDING in types and window is None:
        raise UnsupportedModelError(f"{family.model_type}: sliding layers without a sliding_window")
    if len(set(types)) > 1 and not family.masks_by_layer_type:
        raise UnsupportedModelError(f"{family.model_type} mixes sliding and full layers but its decoder takes one "
                                    "attention mask; the engine cannot run it exactly")
    return AttentionLayout(tuple(types), window if SLIDING in types else None, family.masks_by_layer_type)
