"""Segmenter command line.

``python -m services.segmenter.cli backtest``  BG/NBD + Gamma-Gamma backtest, printing predicted vs actual
repeat purchases per period: offline on a CDNOW-format file (``--file``, default the lifetimes CDNOW sample)
or through a running segmenter (``--url``, the same as ``POST /v1/models/clv/backtest``).

``python -m services.segmenter.cli churn-eval``  offline evaluation: the online churn model's progressive
ROC AUC next to the AUC of 1 - P(alive) on the same customers and dates (default: the full CDNOW log).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from services.segmenter.domain.clv import backtest, parse_cdnow, purchase_days
from services.segmenter.domain.evaluation import compare_churn_models, monthly_dates


def _dataset(name: str) -> Path:
    import lifetimes.datasets

    return Path(lifetimes.datasets.__file__).parent / name


def print_backtest(result: dict[str, Any], out: Any = sys.stdout) -> None:
    params = result["params"]
    out.write(f"customers: {result['customers']}\n")
    out.write("BG/NBD:      " + "  ".join(f"{k}={params[k]:.4f}" for k in ("r", "alpha", "a", "b")) + "\n")
    if "p" in params:
        out.write("Gamma-Gamma: " + "  ".join(f"{k}={params[k]:.4f}" for k in ("p", "q", "v")) + "\n")
    out.write(f"{'period':>6}  {'start':>10}  {'end':>10}  {'predicted':>9}  {'actual':>6}\n")
    for p in result["periods"]:
        out.write(f"{p['period']:>6}  {p['start']:>10}  {p['end']:>10}  {p['predicted']:>9.2f}  {p['actual']:>6}\n")
    out.write(f"{'total':>6}  {'':>10}  {'':>10}  {result['predicted_total']:>9.2f}  {result['actual_total']:>6}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.segmenter.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bt = sub.add_parser("backtest", help="CLV backtest: predicted vs actual repeat purchases per period")
    bt.add_argument("--file", type=Path, help="CDNOW-format transactions (default: the lifetimes CDNOW sample)")
    bt.add_argument("--url", help="a running segmenter, e.g. http://127.0.0.1:8003 (uses its stored orders)")
    bt.add_argument("--token", default="dev_api_token", help="bearer token with models:read (with --url)")
    bt.add_argument("--calibration-end", type=date.fromisoformat, default=date(1997, 9, 30))
    bt.add_argument("--holdout-end", type=date.fromisoformat, default=date(1998, 6, 30))
    bt.add_argument("--period-days", type=int, default=7)
    bt.add_argument("--trait", help="population filter: trait name (with --url)")
    bt.add_argument("--equals", help="population filter: trait value (with --url)")
    bt.add_argument("--json", action="store_true", help="print the JSON result instead of a table")
    ce = sub.add_parser("churn-eval", help="online churn model vs 1 - P(alive), offline on a transaction log")
    ce.add_argument("--file", type=Path, help="CDNOW-format transactions (default: the full CDNOW log)")
    ce.add_argument("--start", type=date.fromisoformat, default=date(1997, 2, 1))
    ce.add_argument("--stop", type=date.fromisoformat, default=date(1998, 4, 1))
    ce.add_argument("--step-days", type=int, default=30)
    ce.add_argument("--label-days", type=int, default=90)
    args = parser.parse_args(argv)

    if args.command == "backtest":
        if args.url:
            body: dict[str, Any] = {"calibration_end": args.calibration_end.isoformat(),
                                    "holdout_end": args.holdout_end.isoformat(), "period_days": args.period_days,
                                    "per_customer_limit": 0}
            if args.trait:
                body["population"] = {"trait": args.trait, "equals": args.equals}
            resp = httpx.post(f"{args.url.rstrip('/')}/v1/models/clv/backtest", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {args.token}"})
            if resp.status_code != 200:
                sys.stderr.write(f"{resp.status_code}: {resp.text}\n")
                return 1
            result = resp.json()
        else:
            path = args.file or _dataset("CDNOW_sample.txt")
            days = purchase_days(parse_cdnow(path.read_text().splitlines()))
            result = backtest(days, args.calibration_end, args.holdout_end, args.period_days,
                              per_customer_limit=0).to_dict()
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_backtest(result)
        return 0

    path = args.file or _dataset("CDNOW_master.txt")
    days = purchase_days(parse_cdnow(path.read_text().splitlines()))
    comparison = compare_churn_models(days, monthly_dates(args.start, args.stop, args.step_days), args.label_days)
    print(json.dumps(comparison.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
