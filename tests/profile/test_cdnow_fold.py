"""The fold's order and RFM figures against lifetimes on the full CDNOW log, without infrastructure:
every customer's events are folded by the same pure functions the service runs."""

from __future__ import annotations

from datetime import UTC, datetime

from lifetimes.utils import summary_data_from_transaction_data

from loyalist.events import Event
from services.profile.domain.profile import fold_all, render
from tests.profile.test_cdnow import OBSERVATION_END, as_messages, load_cdnow


def test_every_cdnow_customer_matches_lifetimes() -> None:
    df = load_cdnow()
    summary = summary_data_from_transaction_data(df, "customer", "date", "amount",
                                                 observation_period_end=OBSERVATION_END, freq="D")
    totals = df.groupby("customer").agg(orders=("amount", "size"), revenue=("amount", "sum"))
    expected = summary.join(totals)
    received = datetime(1998, 7, 1, tzinfo=UTC)
    by_customer: dict[str, list[Event]] = {}
    for message in as_messages(df):
        event = Event.model_validate({**message, "receivedAt": received, "source": "import"})
        by_customer.setdefault(message["userId"], []).append(event)
    now = datetime.fromisoformat(OBSERVATION_END).replace(tzinfo=UTC)
    bad = []
    for customer, row in expected.iterrows():
        doc = render(fold_all(f"p-{customer}", by_customer[str(customer)]), now=now)
        rfm = doc["rfm"]
        same = (doc["orders_count"] == row["orders"] and abs(doc["revenue_total"] - row["revenue"]) < 1e-6
                and rfm["frequency"] == row["frequency"] and rfm["recency_days"] == row["recency"]
                and rfm["T_days"] == row["T"] and abs(rfm["monetary_value"] - row["monetary_value"]) < 1e-6)
        if not same:
            bad.append((customer, doc["orders_count"], rfm, row.to_dict()))
    assert len(expected) == 23_570
    assert not bad, bad[:5]
