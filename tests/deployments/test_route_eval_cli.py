"""The `hilora` command line: route-eval's output contract on a small pool made here."""

import json
import subprocess
import sys

import pytest

TASKS = {
    "numbers": ("arith", [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 9), (12, 5), (7, 7), (20, 4), (8, 30)]]),
    "colours": ("art", [f"Name a colour that goes well with {c}." for c in
                        ("red", "blue", "green", "yellow", "purple", "orange")]),
    "capitals": ("geo", [f"What is the capital city of {c}?" for c in
                         ("France", "Peru", "Japan", "Kenya", "Chile", "Norway")]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pool = [{"model_name": t, "sample": [{"inputs": x, "targets": ""} for x in texts[:5]]}
            for t, (_, texts) in TASKS.items()]
    (d / "pool.json").write_text(json.dumps(pool))
    rows = [{"inputs": texts[5], "task": t, "domain": dom} for t, (dom, texts) in TASKS.items()]
    (d / "inputs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def run(*args):
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_route_eval_prints_metrics_json_last(files):
    out = run("route-eval", "--pool", str(files / "pool.json"), "--inputs", str(files / "inputs.jsonl"))
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {"own_in_candidates", "mean_candidates", "task_top1", "cluster_top1", "unseen_cluster_top1"}
    for k, v in last.items():
        assert v >= 0 and (k == "mean_candidates" or v <= 1)
    assert 1 <= last["mean_candidates"] <= 3
    # three clearly different tasks: every held-out input is routed to its own adapter first
    assert last["task_top1"] == 1.0 and last["own_in_candidates"] == 1.0


def test_route_eval_bad_file_is_a_clear_error(files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    out = run("route-eval", "--pool", str(bad), "--inputs", str(files / "inputs.jsonl"))
    assert out.returncode == 2 and "JSON list" in out.stderr and "Traceback" not in out.stderr


def test_route_eval_through_the_registry_matches_in_process(files, tmp_path):
    from registry.redis_server import RedisServer

    srv = RedisServer(str(tmp_path / "redis")).start()
    try:
        direct = run("route-eval", "--pool", str(files / "pool.json"), "--inputs", str(files / "inputs.jsonl"))
        via = run("route-eval", "--pool", str(files / "pool.json"), "--inputs", str(files / "inputs.jsonl"),
                  "--redis-url", srv.url)
        assert via.returncode == 0, via.stderr
        assert json.loads(via.stdout.strip().splitlines()[-1]) == json.loads(direct.stdout.strip().splitlines()[-1])
        assert srv.client().dbsize() > 0  # the pool really went through Redis
    finally:
        srv.stop()
