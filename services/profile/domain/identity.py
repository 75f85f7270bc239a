"""Identity resolution rules: which identifiers an event carries, deterministic profile ids and the
merge survivor rule.

Every identifier ``(kind, value)`` has a *candidate* profile id derived from it alone. A profile's id is
the smallest candidate id among all identifiers ever linked to it, so the id of a person depends only on
the set of their identifiers, never on the order events arrived in: replaying the log in any interleaving
ends with the same ids. Candidate ids start with ``p`` and the rank of the identifier kind, so user ids
anchor a profile before emails, emails before phones and anonymous ids last.

>>> user = Identifier("user_id", "u1")
>>> anon = Identifier("anonymous_id", "a1")
>>> profile_id_for(user)[:2], profile_id_for(anon)[:2]
('p0', 'p4')
>>> plan = plan_resolution([user, anon], {user: None, anon: profile_id_for(anon)})
>>> plan.target == profile_id_for(user), plan.merge_from == (profile_id_for(anon),)
(True, True)
>>> plan.claims == (user,)
True
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loyalist.events import Event

# Lower rank anchors the profile id (and wins merges).
KIND_RANK: dict[str, int] = {"user_id": 0, "email": 1, "phone": 2, "external": 3, "anonymous_id": 4}
LOOKUP_KINDS = ("user_id", "anonymous_id", "email", "phone", "profile_id")


@dataclass(frozen=True, order=True, slots=True)
class Identifier:
    kind: str
    value: str

    @property
    def rank(self) -> int:
        return KIND_RANK["external" if self.kind.startswith("external:") else self.kind]

    def as_text(self) -> str:
        return f"{self.kind}:{self.value}"


def profile_id_for(identifier: Identifier) -> str:
    """The candidate profile id of one identifier: ``p<rank>`` and 24 hex digits of a SHA-256.

    >>> profile_id_for(Identifier("email", "ann@example.com"))
    'p16aa41b91307c0c85286d2d9f'
    """
    digest = hashlib.sha256(f"{identifier.kind}\x1f{identifier.value}".encode()).hexdigest()
    return f"p{identifier.rank}{digest[:24]}"


def subject_hash(kind: str, value: str) -> str:
    """A non-reversible name for an identifier or profile id, kept in erasure tombstones instead of the
    personal data itself."""
    return hashlib.sha256(f"erased\x1f{kind}\x1f{value}".encode()).hexdigest()


_PHONE_CHARS = re.compile(r"[^\d+]")


def normalize_email(raw: Any) -> str | None:
    """
    >>> normalize_email("  Ann@Example.COM ")
    'ann@example.com'
    >>> normalize_email("not-an-email") is None
    True
    """
    if not isinstance(raw, str):
        return None
    value = raw.strip().lower()
    if "@" not in value or len(value) > 320 or value.startswith("@") or value.endswith("@"):
        return None
    return value


def normalize_phone(raw: Any) -> str | None:
    """Digits with an optional leading ``+``; too short to be a phone number is ignored.

    >>> normalize_phone("+44 (20) 7946-0958")
    '+442079460958'
    >>> normalize_phone("12") is None
    True
    """
    if isinstance(raw, int):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    cleaned = _PHONE_CHARS.sub("", raw.strip())
    plus = cleaned.startswith("+")
    digits = cleaned.replace("+", "")
    if len(digits) < 6:
        return None
    return ("+" if plus else "") + digits


def _text(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def direct_profile_id(event: Event) -> str | None:
    """The profile an internal service addressed directly (``context.loyalist.profileId``)."""
    loyalist = event.context.get("loyalist")
    if isinstance(loyalist, dict):
        return _text(loyalist.get("profileId"))
    return None


def identifiers_of(event: Event) -> list[Identifier]:
    """Every identifier an event links to its person, deduplicated and sorted.

    ``alias`` links its ``previousId`` both as a user id and as an anonymous id, since Segment allows
    either; linking both keeps the outcome independent of which of them was seen first.

    >>> e = Event.model_validate({"type": "identify", "userId": "u1", "anonymousId": "a1",
    ...     "messageId": "m", "timestamp": "2024-01-01T00:00:00Z", "receivedAt": "2024-01-01T00:00:00Z",
    ...     "traits": {"email": "Ann@Example.com", "phone": "+1 555 123 4567"}})
    >>> [i.as_text() for i in identifiers_of(e)]
    ['anonymous_id:a1', 'email:ann@example.com', 'phone:+15551234567', 'user_id:u1']
    """
    found: set[Identifier] = set()
    user_id = _text(event.user_id)
    if user_id:
        found.add(Identifier("user_id", user_id))
    anonymous_id = _text(event.anonymous_id)
    if anonymous_id:
        found.add(Identifier("anonymous_id", anonymous_id))
    if event.type == "alias":
        previous = _text(event.previous_id)
        if previous:
            found.add(Identifier("user_id", previous))
            found.add(Identifier("anonymous_id", previous))
    raw_traits = event.context.get("traits")
    context_traits: dict[str, Any] = raw_traits if isinstance(raw_traits, dict) else {}
    for source in (event.traits, context_traits, event.properties):
        email = normalize_email(source.get("email"))
        if email:
            found.add(Identifier("email", email))
        phone = normalize_phone(source.get("phone"))
        if phone:
            found.add(Identifier("phone", phone))
    external_ids = event.context.get("externalIds")
    if isinstance(external_ids, list):
        for item in external_ids:
            if isinstance(item, dict):
                value, kind = _text(item.get("id")), _text(item.get("type"))
                if value and kind:
                    found.add(Identifier(f"external:{kind.lower()}", value))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class ResolutionPlan:
    """Where an event goes: the target profile, identifiers to claim for it, profiles to merge into it."""

    target: str
    claims: tuple[Identifier, ...]
    merge_from: tuple[str, ...]


def plan_resolution(identifiers: Sequence[Identifier], known: Mapping[Identifier, str | None]) -> ResolutionPlan:
    """Decide the target profile of an event from what the identity graph knows about its identifiers.

    The target is the smallest id among the event's candidate ids and the profiles its identifiers
    already belong to; every other profile found is merged into it. Merges therefore always go towards
    smaller ids and converge whatever order events are resolved in.

    >>> a, b = Identifier("email", "x@y.z"), Identifier("user_id", "u2")
    >>> p = plan_resolution([a, b], {a: "p0aaa", b: "p0bbb"})
    >>> p.target, p.merge_from, p.claims
    ('p0aaa', ('p0bbb',), ())
    >>> c = Identifier("user_id", "u3")
    >>> plan_resolution([c], {a: "p0aaa", b: "p0bbb"}).target == profile_id_for(c)
    True
    """
    if not identifiers:
        raise ValueError("an event without identifiers cannot be resolved")
    # Only this event's identifiers count: ``known`` may hold a whole batch's identity graph.
    found = {pid for i in identifiers if (pid := known.get(i))}
    claims = tuple(i for i in identifiers if not known.get(i))
    # A known identifier's candidate is never below its profile's id, so only new ones can lower it.
    target = min({profile_id_for(i) for i in claims} | found)
    return ResolutionPlan(target=target, claims=claims, merge_from=tuple(sorted(found - {target})))


def merge_reason(event: Event, matched: Sequence[Identifier]) -> str:
    """Why an event merged profiles, for the audit trail.

    >>> e = Event.model_validate({"type": "alias", "userId": "u", "previousId": "v", "messageId": "m",
    ...     "timestamp": "2024-01-01T00:00:00Z", "receivedAt": "2024-01-01T00:00:00Z"})
    >>> merge_reason(e, [])
    'alias'
    """
    if event.type in ("alias", "identify"):
        return event.type
    kinds = {i.kind for i in matched}
    if "email" in kinds:
        return "email_match"
    if "phone" in kinds:
        return "phone_match"
    return "shared_identifier"
