"""Journeys as files, reviewed in git and applied to a running service.

    python -m services.journeys.cli apply -f journeys/examples/abandoned_checkout.yaml
    python -m services.journeys.cli validate -f my_journey.yaml
    python -m services.journeys.cli list
    python -m services.journeys.cli stats abandoned-checkout

A file holds one or more YAML documents (``---``), each a journey definition with an ``id`` and optionally a
``status`` (active, paused, archived). ``apply`` creates the journey, or adds a version when the definition
changed (running instances keep theirs), then sets the status. The service URL and API token come from
``--url`` / ``--token``, else ``LOYALIST_JOURNEYS_URL`` / ``LOYALIST_API_TOKEN``, else the local defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from loyalist.settings import Settings

ACTIONS = {"active": "activate", "paused": "pause", "archived": "archive"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise SystemExit(f"{path}: document {i + 1} is not a mapping")
    return docs


def _problems(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text
    lines = [f"{body.get('code')}: {body.get('message')}"]
    for p in body.get("problems", [])[1:]:
        lines.append(f"  {p['node']}: {p['message']}")
    return "\n".join(lines)


def apply(client: httpx.Client, docs: list[dict[str, Any]], out: Any) -> int:
    failures = 0
    for doc in docs:
        journey_id = doc.get("id")
        if not journey_id:
            print(f"error: a journey file needs an 'id' (name: {doc.get('name')!r})", file=out)
            failures += 1
            continue
        status = doc.get("status")
        if status is not None and status not in ACTIONS:
            print(f"{journey_id}: status must be one of {', '.join(ACTIONS)}", file=out)
            failures += 1
            continue
        resp = client.put(f"/v1/journeys/{journey_id}", content=orjson.dumps(doc),
                          headers={"Content-Type": "application/json"})
        if resp.status_code >= 400:
            print(f"{journey_id}: rejected\n{_problems(resp)}", file=out)
            failures += 1
            continue
        body = resp.json()
        what = "unchanged" if body.get("changed") is False else ("updated" if body["version"] > 1 else "created")
        if status is not None and body["status"] != status:
            moved = client.post(f"/v1/journeys/{journey_id}/{ACTIONS[status]}")
            if moved.status_code >= 400:
                print(f"{journey_id}: {what} v{body['version']} but {ACTIONS[status]} failed\n{_problems(moved)}",
                      file=out)
                failures += 1
                continue
            body = moved.json()
        print(f"{journey_id}: {what} (version {body['version']}, {body['status']})", file=out)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m services.journeys.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("LOYALIST_JOURNEYS_URL") or settings.service_url("journeys"))
    parser.add_argument("--token", default=os.environ.get("LOYALIST_API_TOKEN") or settings.dev_api_token)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("apply", "validate"):
        p = sub.add_parser(name, help=f"{name} journeys from a YAML file")
        p.add_argument("-f", "--file", required=True, type=Path, help="YAML file ('-' for stdin)")
    sub.add_parser("list", help="list journeys")
    stats = sub.add_parser("stats", help="measurement of one journey")
    stats.add_argument("journey_id")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        try:
            if args.command == "apply":
                return apply(client, load_documents(args.file), sys.stdout)
            if args.command == "validate":
                failures = 0
                for doc in load_documents(args.file):
                    resp = client.post("/v1/journeys/validate", content=orjson.dumps(doc),
                                       headers={"Content-Type": "application/json"})
                    ok = resp.status_code == 200
                    failures += not ok
                    print(f"{doc.get('id') or doc.get('name')}: " + ("valid" if ok else f"invalid\n{_problems(resp)}"))
                return 1 if failures else 0
            if args.command == "list":
                for j in client.get("/v1/journeys").raise_for_status().json()["journeys"]:
                    print(f"{j['id']}\t{j['status']}\tv{j['version']}\t{j['name']}")
                return 0
            resp = client.get(f"/v1/journeys/{args.journey_id}/stats")
            if resp.status_code >= 400:
                print(_problems(resp))
                return 1
            print(orjson.dumps(resp.json(), option=orjson.OPT_INDENT_2).decode())
            return 0
        except httpx.HTTPError as exc:
            print(f"error: cannot reach the journeys service at {args.url}: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
