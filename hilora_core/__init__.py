"""hilora_core: the HiLoRA routing algorithm and the routed model engine.

Pure algorithm and model code: numpy, torch, transformers, peft,
sentence-transformers. Nothing here knows about Ray, Redis or HTTP.

Packages: ``routing`` (the paper's method, top to bottom), ``baselines`` (the compared methods),
``engine`` (RoutedLM), ``evaluation`` (metrics and the benchmark harness), ``models`` (loading the
base LLM and the embedder); ``policies`` is the table from policy name to plan function and
``plan`` the RoutingPlan the engine executes. ``docs/architecture.md`` has the whole picture.

Re-exported here: :func:`fit_gaussian`, :class:`GaussianBank`, :func:`select_candidates`,
:func:`allocate_rocs`, :func:`calibrate_eps`, :func:`route_rocs`, :class:`PolicyConfig`,
:func:`make_plans`, :class:`RoutingPlan`, and :class:`RoutedLM` (imported lazily: it pulls in
transformers).
"""

from typing import TYPE_CHECKING

from hilora_core.baselines.arrow import arrow_prototype
from hilora_core.baselines.retriever import cosine_similarity
from hilora_core.errors import (
    AdapterLoadError,
    CapacityError,
    DimensionMismatchError,
    EmptyPoolError,
    HiLoRAError,
    InvalidInputError,
    PlanTooLargeError,
    UnknownAdapterError,
    UnsupportedModelError,
)
from hilora_core.plan import RoutingPlan, TokenRule
from hilora_core.policies import POLICIES, Policy, PolicyConfig, make_plans
from hilora_core.routing.calibration import EpsCalibration, calibrate_eps
from hilora_core.routing.gaussian import FactoredGaussian, GaussianBank, fit_gaussian
from hilora_core.routing.sequence_routing import allocate_rocs, roc_budget, select_candidates
from hilora_core.routing.token_routing import route_rocs, route_rocs_batched
from hilora_core.routing.whitening import Whitener

__all__ = [
    "POLICIES",
    "Policy",
    "AdapterLoadError",
    "CapacityError",
    "PlanTooLargeError",
    "DimensionMismatchError",
    "EmptyPoolError",
    "EpsCalibration",
    "FactoredGaussian",
    "GaussianBank",
    "HiLoRAError",
    "InvalidInputError",
    "PolicyConfig",
    "RoutedLM",
    "RoutingPlan",
    "TokenRule",
    "UnknownAdapterError",
    "UnsupportedModelError",
    "Whitener",
    "allocate_rocs",
    "arrow_prototype",
    "calibrate_eps",
    "cosine_similarity",
    "fit_gaussian",
    "make_plans",
    "roc_budget",
    "route_rocs",
    "route_rocs_batched",
    "select_candidates",
]


if TYPE_CHECKING:
    from hilora_core.engine import RoutedLM


def __getattr__(name: str) -> type["RoutedLM"]:
    # The engine imports transformers (seconds); load it only when asked for.
    if name == "RoutedLM":
        from hilora_core.engine import RoutedLM

        return RoutedLM
    raise AttributeError(f"module 'hilora_core' has no attribute {name!r}")
