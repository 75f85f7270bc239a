"""``loyalist`` — administrative commands shared by every deployment.

    loyalist migrate                      create the keyspace and apply pending CQL migrations
    loyalist topics                       create missing Kafka topics (and list them)
    loyalist credentials create --kind api_token --name ci --scopes profiles:read,segments:read
    loyalist credentials create --kind write_key --name storefront --source web
    loyalist credentials revoke TOKEN

A new credential is printed once; only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from loyalist.settings import Settings


def _cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    from loyalist.cassandra import migrate

    applied = migrate(settings)
    print(f"keyspace {settings.keyspace}: applied {applied or 'nothing (up to date)'}")
    return 0


def _cmd_topics(settings: Settings, _: argparse.Namespace) -> int:
    from loyalist.kafka import ensure_topics
    from loyalist.topics import TOPICS

    created = asyncio.run(ensure_topics(settings))
    for topic in TOPICS:
        name = settings.topic(topic.name)
        mark = "created" if name in created else "exists"
        print(f"{name:<40} {mark:<8} key={topic.key}  {'compacted' if topic.compacted else ''}")
    return 0


def _cmd_credentials(settings: Settings, args: argparse.Namespace) -> int:
    from loyalist.auth import CredentialStore, new_token
    from loyalist.cassandra import connect

    cluster, session = connect(settings, keyspace=settings.keyspace)
    try:
        store = CredentialStore(session)
        if args.action == "create":
            token = new_token("wk" if args.kind == "write_key" else "lt")
            scopes = {"track"} if args.kind == "write_key" else {s for s in args.scopes.split(",") if s}
            if not scopes:
                print("error: an API token needs --scopes", file=sys.stderr)
                return 2
            store.create(token, args.kind, args.name, source=args.source, scopes=scopes)
            print(token)
        else:
            store.revoke(args.token)
            print("revoked")
        return 0
    finally:
        cluster.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loyalist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply CQL migrations")
    sub.add_parser("topics", help="create Kafka topics")
    creds = sub.add_parser("credentials", help="create or revoke write keys and API tokens")
    creds_sub = creds.add_subparsers(dest="action", required=True)
    create = creds_sub.add_parser("create")
    create.add_argument("--kind", choices=["write_key", "api_token"], required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--source", default=None, help="write keys: the source name events are tagged with")
    create.add_argument("--scopes", default="", help="API tokens: comma-separated, e.g. profiles:read,segments:write")
    revoke = creds_sub.add_parser("revoke")
    revoke.add_argument("token")
    args = parser.parse_args(argv)
    settings = Settings()
    handlers = {"migrate": _cmd_migrate, "topics": _cmd_topics, "credentials": _cmd_credentials}
    return handlers[args.command](settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
