"""The `bonedetect` command.

    bonedetect migrate                    # create or upgrade the database schema
    bonedetect create-tenant "St Mary's"  # prints the tenant's API key, once
    bonedetect revoke-key bd_AbCdEfG      # revoke by the key's visible prefix
    bonedetect api --port 8000            # development server (production: gunicorn "api:create_app()")
    bonedetect worker                     # one Celery worker process (one per GPU)
    bonedetect reconciler                 # re-enqueue work the broker lost (run one per deployment)
    bonedetect demo                       # embedded mode: API + worker + a sample batch, serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bonedetect.settings import Settings


def cmd_migrate(settings: Settings, _args) -> int:
    from db.migrate import upgrade

    settings.ensure_home()
    upgrade(settings.database_url)
    print(f"database at head: {settings.database_url}")
    return 0


def cmd_create_tenant(settings: Settings, args) -> int:
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        try:
            tenant, key = create_tenant(session, args.name)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"tenant {tenant.name!r} id={tenant.id}")
    print(f"API key (shown once, store it now): {key}")
    return 0


def cmd_revoke_key(settings: Settings, args) -> int:
    from db.session import make_engine, make_sessionmaker
    from db.tenants import revoke_key

    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        n = revoke_key(session, args.prefix)
    print(f"revoked {n} key(s)")
    return 0 if n else 1


def cmd_api(settings: Settings, args) -> int:
    from api import create_app

    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


def worker_argv(settings: Settings, name: str = "worker@%h", loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool", "solo", "--concurrency", "1", "--queues", settings.queue_name,
        "--hostname", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def cmd_worker(settings: Settings, args) -> int:
    settings.ensure_home()
    return subprocess.call(worker_argv(settings, loglevel=args.loglevel))


def cmd_reconciler(settings: Settings, args) -> int:
    import logging

    from worker.reconciler import Reconciler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    reconciler = Reconciler(settings, interval=args.interval, grace_s=args.grace)
    reconciler.start()
    try:
        reconciler.join()
    except KeyboardInterrupt:
        reconciler.stop()
    return 0


def cmd_demo(settings: Settings, args) -> int:
    from bonedetect.demo import run_demo

    return run_demo(settings, n_images=args.images, host=args.host, port=args.port, serve=not args.no_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bonedetect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(fn=cmd_migrate)
    p = sub.add_parser("create-tenant", help="create a tenant (hospital) and print its API key once")
    p.add_argument("name")
    p.set_defaults(fn=cmd_create_tenant)
    p = sub.add_parser("revoke-key", help="revoke an API key by its visible prefix")
    p.add_argument("prefix")
    p.set_defaults(fn=cmd_revoke_key)
    p = sub.add_parser("api", help="run the API with Flask's development server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_api)
    p = sub.add_parser("worker", help="run one Celery worker process (solo pool)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("reconciler", help="periodically re-enqueue images the broker lost or a dead worker held")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between rounds")
    p.add_argument("--grace", type=float, default=60.0, help="seconds a queued image may wait before it counts as lost")
    p.set_defaults(fn=cmd_reconciler)
    p = sub.add_parser("demo", help="embedded mode: API + worker + a sample batch; serves until Ctrl-C")
    p.add_argument("--images", type=int, default=12, help="synthetic radiographs in the sample batch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    p.add_argument("--no-serve", action="store_true", help="exit after the sample batch instead of serving")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(Settings.from_env(), args)


if __name__ == "__main__":
    sys.exit(main())
