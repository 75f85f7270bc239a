"""The shop owner's report: every figure read from the services' APIs, then printed and drawn as HTML.

``gather`` asks the product (profile, segmenter, journeys, notify APIs, notify's /metrics, the mail sink);
the small functions below only count and sort what those APIs returned. A section whose service is missing
or failing holds ``{"missing": "<why>"}`` and is reported as such.

>>> cohort_table({"a": ["2026-01-03", "2026-02-10"], "b": ["2026-01-20"], "c": ["2026-02-01"]})
{'2026-01': [1.0, 0.5], '2026-02': [1.0]}
>>> histogram([1, 2, 3, 10], bins=3)[0]
(1.0, 4.0, 3)
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any

import httpx

from demo.client import JSON, Unavailable, fetch_all, get_json, parse_prometheus

# ---- pure summaries of what the APIs returned ---------------------------------------------------------------


def month_index(day: str) -> int:
    d = date.fromisoformat(day[:10])
    return d.year * 12 + d.month - 1


def month_label(index: int) -> str:
    return f"{index // 12}-{index % 12 + 1:02d}"


def cohort_table(order_days: dict[str, list[str]], max_months: int = 18) -> dict[str, list[float]]:
    """Share of each acquisition cohort (month of first order) ordering again k months later."""
    cohorts: dict[int, list[set[int]]] = defaultdict(list)
    for days in order_days.values():
        if not days:
            continue
        months = {month_index(d) for d in days}
        first = min(months)
        cohorts[first].append({m - first for m in months})
    last = max((month_index(d) for days in order_days.values() for d in days), default=0)
    table: dict[str, list[float]] = {}
    for first in sorted(cohorts):
        members = cohorts[first]
        span = min(max_months, last - first + 1)
        table[month_label(first)] = [round(sum(1 for m in members if k in m) / len(members), 4) for k in range(span)]
    return table


def histogram(values: Sequence[float], bins: int = 20) -> list[tuple[float, float, int]]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def find_key(doc: Any, needle: str) -> list[tuple[str, Any]]:
    """Every (path, value) whose key contains ``needle`` in a nested document (for model metrics)."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                p = f"{path}.{k}" if path else str(k)
                if needle in str(k).lower() and not isinstance(v, (dict, list)):
                    found.append((p, v))
                walk(v, p)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return found


# ---- gathering ----------------------------------------------------------------------------------------------


async def gather(urls: dict[str, str | None], token: str, user_ids: list[str], journeys: dict[str, str],
                 mail_sink: str, email_domain: str, setup: JSON, *, timeline_sample: int = 2000) -> JSON:
    headers = {"Authorization": f"Bearer {token}"}
    report: JSON = {"setup": setup, "urls": urls}

    def client(service: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=urls[service] or "", headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))

    # -- customers: every profile (profile API), and a sample's stored timelines for the cohort chart
    docs: list[JSON] = []
    if urls.get("profile"):
        async with client("profile") as c:

            async def one(uid: str) -> JSON | None:
                try:
                    return await get_json(c, f"/v1/profiles/{uid}")  # type: ignore[no-any-return]
                except Unavailable:
                    return None

            timeline_errors: list[str] = []

            async def timeline(uid: str) -> list[str]:
                try:
                    body = await get_json(c, f"/v1/profiles/{uid}/events", limit=500)
                except Unavailable as exc:
                    timeline_errors.append(str(exc))
                    return []
                return [str(e.get("timestamp", ""))[:10] for e in body.get("events", [])
                        if e.get("event") == "Order Completed" and e.get("timestamp")]

            docs = [d for d in await fetch_all(user_ids, one, desc="reading profiles") if d]
            step = max(1, len(user_ids) // max(1, timeline_sample))
            sample = user_ids[::step][:timeline_sample]
            timelines = await fetch_all(sample, timeline, desc="reading order timelines (sample)")
        report["customers"] = customers_section(docs, len(user_ids), dict(zip(sample, timelines, strict=True)))
        if timeline_errors:
            report["customers"]["timeline_errors"] = {"count": len(timeline_errors), "first": timeline_errors[0]}
    else:
        report["customers"] = {"missing": "the profile service is not running"}
    profiles = {d["profile_id"]: d for d in docs if d.get("profile_id")}

    # -- segment sizes, straight from the segmenter (the demo's segments were defined before the replay)
    if urls.get("segmenter"):
        async with client("segmenter") as c:
            try:
                report["segments"] = await segments_section(c, profiles)
            except Unavailable as exc:
                report["segments"] = {"missing": str(exc)}
            try:
                report["models"] = models_section(await get_json(c, "/v1/models"))
            except Unavailable as exc:
                report["models"] = {"missing": str(exc)}
    else:
        report["segments"] = {"missing": "the segmenter is not running"}
        report["models"] = {"missing": "the segmenter is not running"}

    # -- journeys
    if urls.get("journeys") and journeys:
        out: JSON = {}
        async with client("journeys") as c:
            for name, jid in journeys.items():
                try:
                    out[name] = await get_json(c, f"/v1/journeys/{jid}/stats")
                except Unavailable as exc:
                    out[name] = {"missing": str(exc)}
        report["journeys"] = out
    else:
        report["journeys"] = {"missing": setup.get("journeys_missing") or "the journeys service is not running"}

    # -- messages (notify's counters and the local mail sink)
    report["messages"] = await messages_section(urls.get("notify"), mail_sink, email_domain)
    report["loyalty"] = loyalty_section(docs)
    return report


def customers_section(all_docs: list[JSON], asked: int, order_days: dict[str, list[str]]) -> JSON:
    # several customer ids resolving to one profile (identity merges) count once
    docs = list({d.get("profile_id"): d for d in all_docs}.values())
    revenue = sum(float(d.get("revenue_total") or 0) for d in docs)
    orders = sum(int(d.get("orders_count") or 0) for d in docs)
    buyers = [d for d in docs if (d.get("orders_count") or 0) >= 1]
    repeat = [d for d in buyers if (d.get("orders_count") or 0) >= 2]
    clv = [(float((d.get("predictions") or {}).get("predicted_clv_365d") or 0), d) for d in docs]
    with_clv = [v for v, d in clv if (d.get("predictions") or {}).get("predicted_clv_365d") is not None]
    top = sorted(clv, key=lambda x: -x[0])[:10]
    return {
        "asked": asked, "found": len(all_docs), "distinct_profiles": len(docs),
        "buyers": len(buyers), "orders": orders, "revenue": round(revenue, 2),
        "repeat_rate": round(len(repeat) / len(buyers), 4) if buyers else None,
        "average_order_value": round(revenue / orders, 2) if orders else None,
        "currency": next((d.get("currency") for d in docs if d.get("currency")), "USD"),
        "cohort_sample": len(order_days), "cohorts": cohort_table(order_days),
        "clv_values": [round(v, 2) for v in with_clv],
        "top_clv": [{"user_id": d.get("user_id"), "email": d.get("email"), "predicted_clv_365d": round(v, 2),
                     "orders": d.get("orders_count"), "revenue": d.get("revenue_total"),
                     "p_alive": (d.get("predictions") or {}).get("p_alive")} for v, d in top if v > 0],
    }


async def segments_section(c: httpx.AsyncClient, profiles: dict[str, JSON]) -> JSON:
    listing = await get_json(c, "/v1/segments")
    sizes: dict[str, JSON] = {}
    for seg in listing.get("segments", []):
        detail = await get_json(c, f"/v1/segments/{seg['id']}")
        sizes[seg["id"]] = {"name": seg.get("name"), "members": detail.get("members"),
                            "backfill": detail.get("backfill")}
    rfm = {v["name"].removeprefix("RFM: "): v["members"] for k, v in sizes.items() if k.startswith("demo_rfm_")}
    stages = {v["name"].removeprefix("Lifecycle: "): v["members"] for k, v in sizes.items()
              if k.startswith("demo_stage_")}
    at_risk: list[JSON] = []
    if "demo_stage_at_risk" in sizes:
        page = await get_json(c, "/v1/segments/demo_stage_at_risk/members", limit=500)
        members = [profiles[m["profile_id"]] for m in page.get("members", []) if m["profile_id"] in profiles]
        at_risk = sorted(members, key=lambda d: -float(d.get("revenue_total") or 0))
    buyers = (sizes.get("demo_buyers") or {}).get("members")
    repeat = (sizes.get("demo_repeat") or {}).get("members")
    return {
        "rfm": dict(sorted(rfm.items(), key=lambda kv: -(kv[1] or 0))),
        "lifecycle": dict(sorted(stages.items(), key=lambda kv: -(kv[1] or 0))),
        "at_risk_count": (sizes.get("demo_stage_at_risk") or {}).get("members"),
        "high_churn_risk": (sizes.get("demo_high_churn") or {}).get("members"),
        "repeat_rate": round(repeat / buyers, 4) if buyers and repeat is not None else None,
        "at_risk_top": [{"user_id": d.get("user_id"), "email": d.get("email"), "revenue": d.get("revenue_total"),
                         "orders": d.get("orders_count"), "last_order_at": d.get("last_order_at")}
                        for d in at_risk[:10]],
        "other_segments": {k: v for k, v in sizes.items() if not k.startswith("demo_")},
    }


def models_section(status: JSON) -> JSON:
    aucs = [(p, v) for p, v in find_key(status, "auc") if isinstance(v, (int, float))]
    return {"auc": aucs, "status": status}


async def messages_section(notify: str | None, mail_sink: str, email_domain: str) -> JSON:
    out: JSON = {}
    if notify:
        try:
            async with httpx.AsyncClient(timeout=10) as c:
                text = (await c.get(f"{notify}/metrics")).text
            for outcome in ("sent", "deferred", "skipped", "failed"):
                samples = parse_prometheus(text, f"loyalist_notify_{outcome}_total")
                by_reason: Counter[str] = Counter()
                for labels, value in samples:
                    by_reason[labels.get("reason") or labels.get("category") or "all"] += int(value)
                out[outcome] = {"total": sum(by_reason.values()), "by": dict(by_reason)}
        except httpx.HTTPError as exc:
            out["missing"] = f"notify /metrics: {type(exc).__name__}"
    else:
        out["missing"] = "the notify service is not running"
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            mails = (await c.get(f"{mail_sink}/messages")).json()
        ours = [m for m in mails if email_domain in str(m.get("to", ""))]
        out["mail_sink"] = {"messages": len(ours), "subjects": dict(Counter(str(m.get("subject")) for m in ours)
                                                                   .most_common(8))}
    except (httpx.HTTPError, ValueError) as exc:
        out["mail_sink"] = {"missing": f"mail sink {mail_sink}: {type(exc).__name__}"}
    return out


def loyalty_section(docs: Iterable[JSON]) -> JSON:
    with_loyalty = [d["loyalty"] for d in docs if isinstance(d.get("loyalty"), dict) and d["loyalty"]]
    if not with_loyalty:
        return {"missing": "no profile carries loyalty data (no loyalty program defined or the ledger is not running)"}
    tiers = Counter(str(x.get("tier") or "none") for x in with_loyalty)
    return {"members": len(with_loyalty), "tiers": dict(tiers.most_common()),
            "points_outstanding": sum(int(x.get("balance") or 0) for x in with_loyalty)}


# ---- text ---------------------------------------------------------------------------------------------------


def _n(v: Any) -> str:
    return "—" if v is None else f"{v:,}"


def money(v: Any, currency: str = "USD") -> str:
    return "—" if v is None else f"{'$' if currency == 'USD' else currency + ' '}{float(v):,.2f}"


def render_text(r: JSON) -> str:
    lines: list[str] = ["", "=" * 78, "LOYALIST DEMO REPORT: an online CD shop, 18 months of real orders", "=" * 78]
    s = r["setup"]
    lines.append(f"Replayed {s.get('history_events', 0):,} history events ({s.get('orders', 0):,} orders of "
                 f"{s.get('customers', 0):,} customers, CDNOW 1997-98, dates moved +{s.get('shift_days', 0):,} days "
                 f"so the history ends today) and {s.get('storefront_events', 0):,} storefront events "
                 f"({s.get('storefront_mix', '')}).")
    c = r["customers"]
    lines.append("\nCUSTOMERS (profile API)")
    if "missing" not in c and c["distinct_profiles"] < c["found"]:
        lines.append(f"  NOTE: {c['found']:,} distinct customers resolved to only {c['distinct_profiles']:,} profiles: "
                     "the identity graph merged customers that share no identifier")
    if "missing" in c:
        lines.append(f"  not available: {c['missing']}")
    else:
        cur = c.get("currency") or "USD"
        lines += [
            f"  customers                 {c['distinct_profiles']:,} profiles for the {c['asked']:,} customer ids "
            f"replayed ({c['found']:,} found)",
            f"  orders                    {c['orders']:,}",
            f"  revenue                   {money(c['revenue'], cur)}",
            f"  average order value       {money(c['average_order_value'], cur)}",
            f"  repeat customers          {c['repeat_rate'] * 100:.1f}% ordered more than once"
            if c.get("repeat_rate") is not None else "  repeat customers          —",
        ]
        if c["top_clv"]:
            lines.append("  top customers by predicted 12-month value (segmenter's BG/NBD + Gamma-Gamma):")
            for t in c["top_clv"][:5]:
                lines.append(f"    {t['email'] or t['user_id']:<34} {money(t['predicted_clv_365d'], cur):>12}  "
                             f"{t['orders']} orders, {money(t['revenue'], cur)} so far")
        else:
            lines.append("  predicted CLV: no profile carries predictions.predicted_clv_365d yet")
    g = r["segments"]
    lines.append("\nSEGMENTS (segmenter API)")
    if "missing" in g:
        lines.append(f"  not available: {g['missing']}")
    else:
        lines.append("  RFM segments: " + ", ".join(f"{k} {_n(v)}" for k, v in g["rfm"].items()))
        lines.append("  lifecycle:    " + ", ".join(f"{k} {_n(v)}" for k, v in g["lifecycle"].items()))
        if g.get("repeat_rate") is not None:
            lines.append(f"  repeat buyers (segment sizes): {g['repeat_rate'] * 100:.1f}% of buyers")
        lines.append(f"  at risk:      {_n(g['at_risk_count'])} customers; churn probability >= 0.7: "
                     f"{_n(g['high_churn_risk'])}")
        for t in g["at_risk_top"][:5]:
            lines.append(f"    {t['email'] or t['user_id']:<34} {money(t['revenue'])} over {t['orders']} orders, "
                         f"last {str(t['last_order_at'])[:10]}")
    m = r["models"]
    if "missing" in m:
        lines.append(f"  churn model: not available: {m['missing']}")
    elif m["auc"]:
        lines.append("  churn model AUC: " + ", ".join(f"{p} = {v:.3f}" for p, v in m["auc"]))
    else:
        churn = m["status"].get("churn") if isinstance(m.get("status"), dict) else None
        seen = (f" ({churn.get('updates')} labelled outcomes so far: {churn.get('churned_seen')} churned, "
                f"{churn.get('retained_seen')} retained; AUC needs both)") if isinstance(churn, dict) else ""
        lines.append("  churn model AUC: not defined yet" + seen)
    j = r["journeys"]
    lines.append("\nJOURNEYS (journeys API)")
    if "missing" in j:
        lines.append(f"  not available: {j['missing']}")
    else:
        for name, st in j.items():
            if "missing" in st:
                lines.append(f"  {name}: {st['missing']}")
                continue
            h = st.get("holdout") or {}
            uplift = h.get("uplift")
            up = (f"uplift {uplift * 100:+.1f} pts (95% CI {h['ci95'][0] * 100:+.1f} … {h['ci95'][1] * 100:+.1f})"
                  if uplift is not None and h.get("ci95") else "uplift: not enough holdout data yet")
            lines.append(f"  {name:<22} entered {st.get('entered', 0):,}, waiting {st.get('waiting', 0):,}, "
                         f"converted {st.get('converted', 0):,}, revenue {money(st.get('attributed_revenue'))}; {up}")
    msg = r["messages"]
    lines.append("\nMESSAGES (notify)")
    if "missing" in msg:
        lines.append(f"  not available: {msg['missing']}")
    else:
        for outcome in ("sent", "deferred", "skipped", "failed"):
            o = msg.get(outcome) or {}
            by = ", ".join(f"{k} {v}" for k, v in (o.get("by") or {}).items() if v)
            lines.append(f"  {outcome:<9} {o.get('total', 0):>6}" + (f"  ({by})" if by else ""))
    sink = msg.get("mail_sink", {})
    lines.append(f"  in the local mail sink: {sink.get('messages', sink.get('missing'))}")
    loy = r["loyalty"]
    lines.append("\nLOYALTY")
    if "missing" in loy:
        lines.append(f"  not available: {loy['missing']}")
    else:
        lines.append("  tiers: " + ", ".join(f"{k} {v:,}" for k, v in loy["tiers"].items())
                     + f"; points outstanding (liability): {loy['points_outstanding']:,}")
    lines.append("\nWHERE TO LOOK NEXT")
    for name, url in r["urls"].items():
        if url:
            lines.append(f"  {name:<10} API docs  {url}/docs")
    for label, url in r["setup"].get("links", {}).items():
        lines.append(f"  {label:<19} {url}")
    return "\n".join(lines)


# ---- HTML ---------------------------------------------------------------------------------------------------


def _color(share: float) -> str:
    # white → deep teal
    t = max(0.0, min(1.0, share * 3))  # retention beyond month 0 is small; stretch the scale
    r, g, b = (int(255 - t * (255 - c)) for c in (0, 109, 119))
    return f"rgb({r},{g},{b})"


def svg_heatmap(table: dict[str, list[float]]) -> str:
    if not table:
        return "<p>No cohort data.</p>"
    cell, left, top = 26, 70, 24
    cols = max(len(v) for v in table.values())
    w, h = left + cols * cell + 10, top + len(table) * cell + 10
    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="cohort retention">']
    for k in range(cols):
        parts.append(f'<text x="{left + k * cell + cell / 2}" y="16" font-size="10" text-anchor="middle">{k}</text>')
    for row, (label, values) in enumerate(table.items()):
        y = top + row * cell
        parts.append(f'<text x="{left - 6}" y="{y + 17}" font-size="11" text-anchor="end">{html.escape(label)}</text>')
        for k, share in enumerate(values):
            parts.append(f'<rect x="{left + k * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{_color(share if k else 0.0)}"><title>{label} +{k} months: {share:.1%}</title></rect>')
            if k:
                parts.append(f'<text x="{left + k * cell + cell / 2}" y="{y + 16}" font-size="8" '
                             f'text-anchor="middle">{share * 100:.0f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: list[tuple[str, float]], *, width: int = 440, unit: str = "") -> str:
    if not items:
        return "<p>No data.</p>"
    bar, left = 22, 170
    top_value = max(v for _, v in items) or 1
    h = len(items) * bar + 10
    parts = [f'<svg width="{width}" height="{h}" role="img">']
    for i, (label, value) in enumerate(items):
        y = i * bar
        length = (width - left - 80) * value / top_value
        parts.append(f'<text x="{left - 6}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{bar - 6}" fill="#006d77"/>'
                     f'<text x="{left + length + 4}" y="{y + 15}" font-size="11">{value:,.0f}{unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(values: list[float], *, width: int = 560, height: int = 200) -> str:
    bins = histogram([v for v in values if v > 0], 24)
    if not bins:
        return "<p>No customer carries a predicted CLV yet.</p>"
    top = max(c for _, _, c in bins) or 1
    bw = (width - 60) / len(bins)
    parts = [f'<svg width="{width}" height="{height + 30}" role="img">']
    for i, (lo, hi, c) in enumerate(bins):
        bh = (height - 10) * math.sqrt(c / top)  # sqrt scale: the long tail stays visible
        x = 50 + i * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="#83c5be">'
                     f'<title>${lo:,.0f} to ${hi:,.0f}: {c} customers</title></rect>')
    lo0, hi_last = bins[0][0], bins[-1][1]
    parts.append(f'<text x="50" y="{height + 16}" font-size="11">${lo0:,.0f}</text>'
                 f'<text x="{width - 10}" y="{height + 16}" font-size="11" text-anchor="end">${hi_last:,.0f}</text>'
                 f'<text x="{width / 2}" y="{height + 28}" font-size="11" text-anchor="middle">predicted 12-month '
                 f'value per customer (bar height: square root of count)</text></svg>')
    return "".join(parts)


def render_html(r: JSON, text: str) -> str:
    c, g = r["customers"], r["segments"]
    cohorts = svg_heatmap(c.get("cohorts", {})) if "missing" not in c else f"<p>{html.escape(c['missing'])}</p>"
    if c.get("timeline_errors"):
        cohorts += (f"<p>{c['timeline_errors']['count']} timelines could not be read: "
                    f"{html.escape(c['timeline_errors']['first'])}</p>")
    clv = svg_histogram(c.get("clv_values", [])) if "missing" not in c else ""
    rfm = (svg_bars([(k, float(v or 0)) for k, v in g["rfm"].items()]) if "missing" not in g
           else f"<p>{html.escape(g['missing'])}</p>")
    stages = svg_bars([(k, float(v or 0)) for k, v in g["lifecycle"].items()]) if "missing" not in g else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Loyalist demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
h2{{border-bottom:2px solid #006d77;padding-bottom:4px}} pre{{background:#f4f7f7;padding:1em;overflow-x:auto;
font-size:12px}} .grid{{display:grid;grid-template-columns:1fr 1fr;gap:2em}}</style></head><body>
<h1>Loyalist demo: an online CD shop</h1>
<p>Every figure below was read from the running services' APIs after replaying the CDNOW order history and a
simulated storefront through the public ingest API.</p>
<h2>Cohort retention</h2><p>Share of each month's new customers who ordered again <i>k</i> months later
(from the stored order timelines of {c.get("cohort_sample", 0):,} customers, read through the profile API).</p>
{cohorts}
<div class="grid"><div><h2>RFM segments</h2>{rfm}</div><div><h2>Lifecycle stages</h2>{stages}</div></div>
<h2>Predicted customer lifetime value</h2>{clv}
<h2>The full report</h2><pre>{html.escape(text)}</pre></body></html>"""
