"""The model deployment's static scheduler (kept for comparison), without Ray: mixed batches, and batches that
overflow the slots."""

import pytest

from deployments.contracts import AdapterLocation, GenerateCall
from hilora_core.errors import CapacityError
from hilora_core.plan import RoutingPlan


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from deployments.model import ModelReplica, build_engine
    from hilora_core.models.base_model import resolve_base
    from tests.engine_helpers import make_adapter

    tmp = tmp_path_factory.mktemp("batching")
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None))
    make_adapter(base, tmp / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    make_adapter(base, tmp / "b", seed=2, r=4, target_modules=["q_proj", "v_proj"])
    del base
    from deployments.config import AppConfig

    config = {"model": {"max_slots": 1, "host_cache_size": 4, "scheduler": "static"},
              "registry": {"seed_manifest": None}}
    model = ModelReplica(config, engine=build_engine(AppConfig.model_validate(config)))
    yield model, {"a": AdapterLocation(location=str(tmp / "a")), "b": AdapterLocation(location=str(tmp / "b"))}


def request(plan: RoutingPlan, sources: dict, prompt: str) -> GenerateCall:
    return GenerateCall(plan=plan.to_dict(), sources={a: sources[a] for a in plan.adapters}, prompt=prompt,
                        max_tokens=4)


def test_batch_overflowing_the_slots_is_split_and_matches_single_runs(replica):
    model, sources = replica
    reqs = [request(RoutingPlan.single("a"), sources, "One, two,"),
            request(RoutingPlan.single("b"), sources, "Red, green,")]
    together = model.run_batch(reqs)  # two adapters, one slot: the engine refuses, the replica splits
    assert all("error" not in r for r in together), together
    alone = [model.run_batch([r])[0] for r in reqs]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert all(r["completion_tokens"] >= 1 for r in together)


def test_a_single_plan_larger_than_the_slots_gets_a_capacity_error(replica):
    model, sources = replica
    plan = RoutingPlan(adapters=("a", "b"), rocs=(2, 2))
    (out,) = model.run_batch([request(plan, sources, "Hello")])
    assert isinstance(out["error"], CapacityError) and "slots" in str(out["error"])
    # and the replica keeps serving
    (ok,) = model.run_batch([request(RoutingPlan.single("a"), sources, "Hello")])
    assert "error" not in ok
