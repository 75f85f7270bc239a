"""ISO 8601 durations (``PT5S``, ``P7D``, ``-P3D``) and times of day, as marketers write them.

>>> parse_duration("PT5S")
datetime.timedelta(seconds=5)
>>> parse_duration("P1DT2H30M")
datetime.timedelta(days=1, seconds=9000)
>>> parse_duration("-P3D")
datetime.timedelta(days=-3)
>>> parse_duration("P2W")
datetime.timedelta(days=14)
>>> format_duration(parse_duration("P1DT2H30M"))
'P1DT2H30M'
>>> parse_time_of_day("09:30")
datetime.time(9, 30)
>>> parse_duration("5 minutes")
Traceback (most recent call last):
...
ValueError: '5 minutes' is not an ISO 8601 duration (e.g. PT5S, PT1H, P7D)
"""

from __future__ import annotations

import re
from datetime import time, timedelta

# Years and months are deliberately absent: their length varies, and a journey delay must be exact.
_DURATION = re.compile(
    r"^(?P<sign>-)?P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an ISO 8601 duration (e.g. PT5S, PT1H, P7D)")
    match = _DURATION.match(text.strip().upper())
    if not match or text.strip().upper() in ("P", "PT", "-P", "-PT") or text.strip().upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO 8601 duration (e.g. PT5S, PT1H, P7D)")
    parts = {k: float(v) for k, v in match.groupdict().items() if v and k != "sign"}
    delta = timedelta(
        weeks=parts.get("weeks", 0),
        days=parts.get("days", 0),
        hours=parts.get("hours", 0),
        minutes=parts.get("minutes", 0),
        seconds=parts.get("seconds", 0),
    )
    return -delta if match.group("sign") else delta


def format_duration(delta: timedelta) -> str:
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    out = f"{sign}P" + (f"{days}D" if days else "")
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{seconds}S" if seconds else "")
    if clock or not days:
        out += "T" + (clock or "0S")
    return out


def parse_time_of_day(text: str) -> time:
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a time of day HH:MM (24h)")
    return time(int(match.group(1)), int(match.group(2)))
