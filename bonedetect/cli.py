"""The `bonedetect` command.

    bonedetect migrate                    # create or upgrade the database schema
    bonedetect create-tenant "St Mary's"  # prints the tenant's API key, once
    bonedetect issue-key "St Mary's"      # another key for a tenant (rotation: issue, switch, revoke)
    bonedetect revoke-key bd_AbCdEfG      # revoke by the key's visible prefix
    bonedetect webhook-secret "St Mary's" # rotate the secret that signs job-completion callbacks
    bonedetect api --port 8000            # development server (production: gunicorn "api:create_app()")
    bonedetect worker                     # one Celery worker process (one per GPU)
    bonedetect reconciler                 # re-enqueue work the broker lost (run one per deployment)
    bonedetect purge --older-than-days 30 # delete old jobs: rows and blobs (the reconciler does it with RETENTION_DAYS)
    bonedetect purge --job JOB_ID         # delete one job, its rows and its blobs, now
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
        secret = tenant.webhook_secret
    print(f"API key (shown once, store it now): {key}")
    print(f"webhook secret (verifies job-completion callbacks; `bonedetect webhook-secret` rotates it): {secret}")
    return 0


def cmd_webhook_secret(settings: Settings, args) -> int:
    from db.session import make_engine, make_sessionmaker
    from db.tenants import rotate_webhook_secret

    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        try:
            secret = rotate_webhook_secret(session, args.name)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(f"new webhook secret for {args.name!r} (callbacks are signed with it from now on): {secret}")
    return 0


def cmd_issue_key(settings: Settings, args) -> int:
    from sqlalchemy import select

    from db.models import Tenant
    from db.session import make_engine, make_sessionmaker
    from db.tenants import issue_key

    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == args.name))
        if tenant is None:
            print(f"error: no tenant named {args.name!r}", file=sys.stderr)
            return 1
        key = issue_key(session, tenant)
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


def worker_argv(settings: Settings, name: str = "worker@%h", loglevel: str = "INFO", app: str = "worker.app") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--queues", f"{settings.queue_name},{settings.callback_queue}",  # pool and concurrency: WORKER_CONCURRENCY
        "--hostname", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def cmd_worker(settings: Settings, args) -> int:
    settings.ensure_home()
    return subprocess.call(worker_argv(settings, loglevel=args.loglevel))


def cmd_reconciler(settings: Settings, args) -> int:
    from bonedetect.logs import configure_logging
    from worker.reconciler import Reconciler

    configure_logging(settings.log_level, settings.log_format)
    reconciler = Reconciler(settings, interval=args.interval, grace_s=args.grace)
    reconciler.start()
    try:
        reconciler.join()
    except KeyboardInterrupt:
        reconciler.stop()
    return 0


def cmd_purge(settings: Settings, args) -> int:
    from db.blobstore import open_blob_store
    from db.retention import purge_expired, purge_job, purge_orphan_blobs
    from db.session import make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(settings.database_url))
    blobs = open_blob_store(settings.blob_url)
    if args.job:
        purged = purge_job(sessions, blobs, args.job)
        if purged is None:
            print(f"error: no job {args.job}", file=sys.stderr)
            return 1
        print(f"purged job {purged.job_id}: {purged.images} images, their rows and blobs")
        return 0
    days = args.older_than_days if args.older_than_days is not None else settings.retention_days
    if days <= 0:
        print("error: give --older-than-days N (or set RETENTION_DAYS), or --job ID", file=sys.stderr)
        return 2
    jobs = purge_expired(sessions, blobs, days)
    hours = args.orphans_older_than_hours if args.orphans_older_than_hours is not None else settings.orphan_blob_hours
    orphans = purge_orphan_blobs(sessions, blobs, hours)
    print(f"purged {jobs} jobs created more than {days:g} days ago, and {orphans} blob folders without a job row")
    return 0


def cmd_demo(settings: Settings, args) -> int:
    from bonedetect.demo import run_demo

    return run_demo(settings, n_images=args.images, host=args.host, port=args.port, serve=not args.no_serve, data=args.data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bonedetect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(fn=cmd_migrate)
    p = sub.add_parser("create-tenant", help="create a tenant (hospital) and print its API key once")
    p.add_argument("name")
    p.set_defaults(fn=cmd_create_tenant)
    p = sub.add_parser("webhook-secret", help="give a tenant a new webhook secret (signs its callbacks) and print it")
    p.add_argument("name")
    p.set_defaults(fn=cmd_webhook_secret)
    p = sub.add_parser("issue-key", help="issue another API key to an existing tenant (key rotation)")
    p.add_argument("name")
    p.set_defaults(fn=cmd_issue_key)
    p = sub.add_parser("revoke-key", help="revoke an API key by its visible prefix")
    p.add_argument("prefix")
    p.set_defaults(fn=cmd_revoke_key)
    p = sub.add_parser("api", help="run the API with Flask's development server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_api)
    p = sub.add_parser("worker", help="run one Celery worker process (WORKER_CONCURRENCY chunks at once)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("reconciler", help="periodically re-enqueue images the broker lost or a dead worker held")
    p.add_argument("--interval", type=float, help="seconds between rounds (default: RECONCILE_INTERVAL_S, 30)")
    p.add_argument("--grace", type=float, help="seconds a queued image may wait before it counts as lost (default: RECONCILE_GRACE_S, 60)")
    p.set_defaults(fn=cmd_reconciler)
    p = sub.add_parser("purge", help="delete jobs (rows and blobs): one by id, or all older than N days")
    p.add_argument("--job", help="purge this job now, whatever its age or state")
    p.add_argument("--older-than-days", type=float, help="purge jobs created before this many days ago (default: RETENTION_DAYS)")
    p.add_argument("--orphans-older-than-hours", type=float, help="also blob folders without a job row (default: ORPHAN_BLOB_HOURS)")
    p.set_defaults(fn=cmd_purge)
    p = sub.add_parser("demo", help="embedded mode: API + worker + a sample batch; serves until Ctrl-C")
    p.add_argument("--images", type=int, default=12, help="radiographs in the sample batch")
    p.add_argument("--data", metavar="DIR", help="real radiographs from a folder in BTXRD's layout (its held-out test "
                   "part), scored against their outlines, instead of synthetic ones")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    p.add_argument("--no-serve", action="store_true", help="exit after the sample batch instead of serving")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(Settings.from_env(), args)


if __name__ == "__main__":
    sys.exit(main())
