"""``hilora registry ...`` commands: import a manifest, list adapters.

The ``hilora`` console script (``deployments/cli.py``) adds these through :func:`add_registry_commands`;
``python -m registry.cli registry ...`` runs the same commands standalone.

    hilora registry import MANIFEST --source-pattern 'Styxxxx/llama2_7b_lora-{model_name}' \\
        [--rank R --alpha A --targets q_proj v_proj] [--revision REV] [--replace | --skip-existing]
        [--offline] [--redis-url URL]
    hilora registry list [--redis-url URL] --json
    hilora registry reembed --embedder all-mpnet-base-v2 --to-prefix hilora-mpnet [--key-prefix hilora]
    hilora registry stop-embedded [--dir ./var/redis]

Without a Redis URL the commands use the embedded Redis under ``./var/redis`` and stop it again when they
started it (a running service's server is left running).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from hilora_core.errors import HiLoRAError

from .config import AdmissionSettings, EmbedderSettings, RegistryConfig, StoreSettings
from .connection import EmbeddedRedis, embedded_redis_scope
from .manifest import import_manifest
from .reembed import reembed_pool
from .registry import Registry


def _config(args: argparse.Namespace, key_prefix: str | None = None) -> RegistryConfig:
    store = StoreSettings(redis_url=args.redis_url or None)
    if key_prefix:  # another pool, with its own change feed
        store = replace(store, key_prefix=key_prefix, channel=f"{key_prefix}:events")
    return RegistryConfig(store=store, embedder=EmbedderSettings(model=getattr(args, "embedder", None)),
                          admission=AdmissionSettings(hub_lookup=not getattr(args, "offline", False)))


def _cmd_import(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with embedded_redis_scope(cfg), Registry(cfg) as reg:
        report = import_manifest(
            reg, args.manifest, args.source_pattern, rank=args.rank, alpha=args.alpha, targets=args.targets,
            revision=args.revision, base_model=args.base_model, replace=args.replace,
            skip_existing=args.skip_existing,
        )
        out = {**report.to_dict(), "epoch": reg.epoch(), "total": reg.count()}
    print(json.dumps(out))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with embedded_redis_scope(cfg), Registry(cfg) as reg:
        records = reg.list_all()
    if args.json:
        print(json.dumps([r.to_dict() for r in records]))
    else:
        for r in records:
            print(f"{r.id}\t{r.source.location}\trank={r.rank}\tsamples={r.sample_count}\t{r.status}")
    return 0


def _cmd_reembed(args: argparse.Namespace) -> int:
    source_cfg = RegistryConfig(store=StoreSettings(redis_url=args.redis_url or None, key_prefix=args.key_prefix),
                                admission=AdmissionSettings(hub_lookup=False))
    target_cfg = _config(args, key_prefix=args.to_prefix)
    with embedded_redis_scope(source_cfg), Registry(source_cfg) as src, Registry(target_cfg) as dst:
        report = reembed_pool(src, dst)
        out = {**report.to_dict(), "target": {"key_prefix": args.to_prefix, "adapters": dst.count(),
                                              "embedder": dst.identity.name}}
    print(json.dumps(out))
    return 0


def _cmd_stop_embedded(args: argparse.Namespace) -> int:
    server = EmbeddedRedis(args.dir)
    if not server._ping():
        print(f"no embedded Redis is running in {server.data_dir}")
        return 0
    server.stop()
    print(f"stopped the embedded Redis in {server.data_dir}")
    return 0


def handle_registry(args: argparse.Namespace) -> int:
    """Run a parsed ``registry`` command; typed errors become exit code 2 with the message on stderr."""
    try:
        return args.registry_handler(args)
    except HiLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def add_registry_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``registry`` command group to a parent parser's subparsers.

    The chosen command's handler is ``args.func`` (alias ``args.handler``): call it with ``args``; it returns
    the exit code (typed errors: message on stderr, exit code 2).
    """
    reg = subparsers.add_parser("registry", help="manage the adapter registry")
    sub = reg.add_subparsers(dest="registry_command", required=True)

    imp = sub.add_parser("import", help="register every adapter of a pool manifest")
    imp.add_argument("manifest", help="JSON list of {model_name, sample: [{inputs, targets}]}")
    imp.add_argument("--source-pattern", required=True,
                     help="adapter source per name, e.g. 'Styxxxx/llama2_7b_lora-{model_name}' or a folder pattern")
    imp.add_argument("--rank", type=int, help="LoRA rank, when adapter_config.json cannot be reached")
    imp.add_argument("--alpha", type=float, help="lora_alpha, when adapter_config.json cannot be reached")
    imp.add_argument("--targets", nargs="+", help="target modules, when adapter_config.json cannot be reached")
    imp.add_argument("--revision", help="hub revision of every adapter")
    imp.add_argument("--base-model", help="base model of the adapters, if their configs do not say")
    group = imp.add_mutually_exclusive_group()
    group.add_argument("--replace", action="store_true", help="overwrite adapters that exist")
    group.add_argument("--skip-existing", action="store_true", help="leave adapters that exist as they are")
    imp.add_argument("--offline", action="store_true", help="do not try the Hugging Face Hub")
    imp.add_argument("--embedder", help="the service's embedder (its embedder.model: a name such as "
                     "all-mpnet-base-v2, a folder or a hub id; default: the offline all-MiniLM-L6-v2)")
    imp.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else the embedded Redis)")
    imp.set_defaults(func=handle_registry, handler=handle_registry, registry_handler=_cmd_import)

    lst = sub.add_parser("list", help="list registered adapters")
    lst.add_argument("--json", action="store_true", help="one JSON array of adapter records on stdout")
    lst.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else the embedded Redis)")
    lst.set_defaults(func=handle_registry, handler=handle_registry, registry_handler=_cmd_list)

    re = sub.add_parser("reembed", help="copy the pool to another key prefix, its stored sample texts embedded by "
                        "another embedder (switching the service's embedder; the source pool is left as it is)")
    re.add_argument("--embedder", required=True, help="the new embedder (name, folder or hub id)")
    re.add_argument("--to-prefix", required=True, help="key prefix of the copy (then set registry.store.key_prefix)")
    re.add_argument("--key-prefix", default=StoreSettings().key_prefix, help="the source pool (default: %(default)s)")
    re.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else the embedded Redis)")
    re.set_defaults(func=handle_registry, handler=handle_registry, registry_handler=_cmd_reembed)

    stop = sub.add_parser("stop-embedded", help="shut down the embedded Redis of a data folder (saving first)")
    stop.add_argument("--dir", default=StoreSettings().embedded_dir,
                      help="its data folder (default: %(default)s, the service's registry.store.embedded_dir)")
    stop.set_defaults(func=handle_registry, handler=handle_registry, registry_handler=_cmd_stop_embedded)
    return reg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hilora")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
