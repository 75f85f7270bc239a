"""Notify's HTTP API: transactional sends, the delivery log, templates with preview, consent, provider
feedback — and the public, signed endpoints carried in messages (unsubscribe, click, open)."""

from __future__ import annotations

import asyncio
import html
import uuid
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs

import orjson
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from loyalist.auth import require_scope
from loyalist.http import ApiError
from loyalist.topics import MESSAGE_REQUESTS
from services.notify.context import NotifyContext
from services.notify.domain.messages import FINAL_STATES, InvalidRequest, MessageRequest, iso, merge_consent
from services.notify.domain.policy import DEFAULT_GROUP
from services.notify.domain.templates import Template, build_context, render, validate
from services.notify.links import CLICK, OPEN, UNSUBSCRIBE
from services.notify.store import LogRow

router = APIRouter()
public = APIRouter()

# A 1x1 transparent GIF.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


def ctx(request: Request) -> NotifyContext:
    notify = getattr(request.app.state, "notify", None)
    if notify is None:
        raise ApiError(503, "not_ready", "notify is starting")
    return notify  # type: ignore[no-any-return]


# ---- messages -----------------------------------------------------------------------------------------
class Recipient(BaseModel):
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=32)
    url: str | None = Field(default=None, max_length=2000)


class MessageIn(BaseModel):
    idempotencyKey: str | None = Field(default=None, min_length=1, max_length=300)
    profileId: str | None = Field(default=None, max_length=200)
    to: Recipient | None = None
    channel: Literal["email", "sms", "webhook"] = "email"
    category: Literal["marketing", "transactional"] = "transactional"
    templateId: str = Field(min_length=1, max_length=64)
    data: dict[str, Any] = Field(default_factory=dict)
    subscriptionGroup: str | None = Field(default=None, max_length=64)
    expiresAt: datetime | None = None


@router.post("/v1/messages", tags=["messages"], status_code=202, summary="Send a message (transactional API)")
async def send_message(
    body: MessageIn,
    notify: NotifyContext = Depends(ctx),
    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", max_length=300),
    wait: float = Query(default=0, ge=0, le=30, description="seconds to wait for an outcome"),
    _: Any = Depends(require_scope("messages:write")),
) -> Response:
    key = body.idempotencyKey or idempotency_key or f"api:{uuid.uuid4()}"
    to = {k: v for k, v in (body.to.model_dump() if body.to else {}).items() if v}
    if body.channel != "webhook" and await notify.notifier.templates.get(body.templateId, body.channel) is None:
        raise ApiError(400, "unknown_template", f"no {body.channel} template {body.templateId!r}")
    doc: dict[str, Any] = {
        "idempotencyKey": key, "profileId": body.profileId, "channel": body.channel, "category": body.category,
        "templateId": body.templateId, "data": body.data, "requestedAt": iso(notify.clock()), "source": "api",
    }
    if to:
        doc["to"] = to
    if body.subscriptionGroup:
        doc["subscriptionGroup"] = body.subscriptionGroup
    if body.expiresAt:
        doc["expiresAt"] = iso(body.expiresAt)
    try:
        req = MessageRequest.from_wire(doc)
    except InvalidRequest as exc:
        raise ApiError(400, "invalid_message", str(exc)) from exc
    existing = await notify.store.get(key)
    if existing is None:
        try:
            await notify.producer.send_and_wait(notify.settings.topic(MESSAGE_REQUESTS.name), orjson.dumps(doc),
                                                key=req.kafka_key.encode())
        except KafkaError as exc:
            raise ApiError(503, "kafka_unavailable", "the message could not be queued; retry with the same key",
                           headers={"Retry-After": "1"}) from exc
    deadline = asyncio.get_running_loop().time() + wait
    row = existing
    while wait and asyncio.get_running_loop().time() < deadline:
        row = await notify.store.get(key)
        if row is not None and (row.status in FINAL_STATES or row.status in ("deferred", "retrying")):
            break
        await asyncio.sleep(0.05)
    if row is not None and (row.status in FINAL_STATES or row.status in ("deferred", "retrying")):
        return Response(orjson.dumps(row.public()), status_code=200, media_type="application/json")
    accepted = {"id": req.message_id, "idempotencyKey": key, "status": row.status if row else "queued"}
    return Response(orjson.dumps(accepted), status_code=202, media_type="application/json")


@router.get("/v1/messages", tags=["messages"], summary="The delivery log of a customer or an idempotency key")
async def list_messages(
    profile_id: str | None = Query(default=None, max_length=200),
    user_id: str | None = Query(default=None, max_length=200),
    idempotency_key: str | None = Query(default=None, max_length=300),
    limit: int = Query(default=50, ge=1, le=500),
    notify: NotifyContext = Depends(ctx),
    _: Any = Depends(require_scope("messages:read")),
) -> dict[str, Any]:
    if idempotency_key:
        row = await notify.store.get(idempotency_key)
        rows: list[LogRow] = [row] if row else []
    elif profile_id or user_id:
        rows = await notify.store.list_for(profile_id=profile_id, user_id=user_id, limit=limit)
    else:
        raise ApiError(400, "missing_filter", "give one of profile_id, user_id, idempotency_key")
    return {"messages": [r.public() for r in rows]}


@router.get("/v1/messages/{message_id}", tags=["messages"], summary="One message of the delivery log")
async def get_message(message_id: str, notify: NotifyContext = Depends(ctx),
                      _: Any = Depends(require_scope("messages:read"))) -> dict[str, Any]:
    row = await notify.store.by_message_id(message_id)
    if row is None:
        raise ApiError(404, "message_not_found", f"no message {message_id!r}")
    return row.public()


# ---- templates ----------------------------------------------------------------------------------------
class TemplateIn(BaseModel):
    channel: Literal["email", "sms", "webhook"] = "email"
    name: str = Field(default="", max_length=200)
    subject: str = Field(default="", max_length=2000)
    html: str = Field(default="", max_length=500_000)
    text: str = Field(default="", max_length=100_000)
    subscriptionGroup: str = Field(default=DEFAULT_GROUP, max_length=64)
    sampleData: dict[str, Any] = Field(default_factory=dict)


def template_out(t: Template) -> dict[str, Any]:
    return {"id": t.id, "channel": t.channel, "name": t.name, "subject": t.subject, "html": t.html, "text": t.text,
            "subscriptionGroup": t.group, "sampleData": dict(t.sample_data), "version": t.version,
            "builtin": t.builtin}


@router.get("/v1/templates", tags=["templates"], summary="All templates")
async def list_templates(notify: NotifyContext = Depends(ctx),
                         _: Any = Depends(require_scope("templates:read"))) -> dict[str, Any]:
    return {"templates": [template_out(t) for t in await notify.store.templates()]}


async def _template_or_404(notify: NotifyContext, template_id: str, channel: str) -> Template:
    t = await notify.store.template(template_id, channel)
    if t is None:
        raise ApiError(404, "template_not_found", f"no {channel} template {template_id!r}")
    return t


@router.get("/v1/templates/{template_id}", tags=["templates"], summary="One template")
async def get_template(template_id: str, channel: str = Query(default="email"), notify: NotifyContext = Depends(ctx),
                       _: Any = Depends(require_scope("templates:read"))) -> dict[str, Any]:
    return template_out(await _template_or_404(notify, template_id, channel))


@router.put("/v1/templates/{template_id}", tags=["templates"], summary="Create or replace a template",
            responses={400: {"description": "Syntax error or undefined variable"}})
async def put_template(template_id: str, body: TemplateIn, notify: NotifyContext = Depends(ctx),
                       _: Any = Depends(require_scope("templates:write"))) -> dict[str, Any]:
    current = await notify.store.template(template_id, body.channel)
    t = Template(id=template_id, channel=body.channel, name=body.name or template_id, subject=body.subject,
                 html=body.html, text=body.text, group=body.subscriptionGroup, sample_data=body.sampleData,
                 version=(current.version + 1) if current else 1, builtin=False)
    problems = validate(t)
    if problems:
        raise ApiError(400, "invalid_template", f"{problems[0]['field']}: {problems[0]['message']}",
                       problems=problems)
    await notify.store.put_template(t, notify.clock())
    notify.notifier.templates.invalidate(template_id, body.channel)
    return template_out(t)


@router.delete("/v1/templates/{template_id}", tags=["templates"], status_code=204, summary="Delete a template")
async def delete_template(template_id: str, channel: str = Query(default="email"),
                          notify: NotifyContext = Depends(ctx),
                          _: Any = Depends(require_scope("templates:write"))) -> Response:
    await _template_or_404(notify, template_id, channel)
    await notify.store.delete_template(template_id, channel)
    notify.notifier.templates.invalidate(template_id, channel)
    return Response(status_code=204)


class PreviewIn(BaseModel):
    profileId: str | None = Field(default=None, max_length=200)
    data: dict[str, Any] | None = None
    channel: Literal["email", "sms", "webhook"] = "email"


@router.post("/v1/templates/{template_id}/preview", tags=["templates"],
             summary="Render a template against a real profile (or the sample)")
async def preview_template(template_id: str, body: PreviewIn, notify: NotifyContext = Depends(ctx),
                           _: Any = Depends(require_scope("templates:read"))) -> dict[str, Any]:
    from services.notify.domain.templates import SAMPLE_DATA, SAMPLE_PROFILE, RenderError

    t = await _template_or_404(notify, template_id, body.channel)
    profile: dict[str, Any] | None = SAMPLE_PROFILE
    if body.profileId:
        profile = await notify.profiles.get(body.profileId)
        if profile is None:
            raise ApiError(404, "profile_not_found", f"no profile {body.profileId!r} in the hot store")
    data = body.data if body.data is not None else {**SAMPLE_DATA, **dict(t.sample_data)}
    context = build_context(profile, data, notify.links.unsubscribe_url("preview"), "preview")
    try:
        out = render(t, context)
    except RenderError as exc:
        raise ApiError(400, "render_error", str(exc), problems=[exc.as_dict()]) from exc
    return {"subject": out.subject, "html": out.html, "text": out.text, "profileId": body.profileId}


# ---- consent ------------------------------------------------------------------------------------------
class ConsentIn(BaseModel):
    channel: Literal["email", "sms", "webhook"]
    subscribed: bool
    group: str = Field(default="*", max_length=64)


@router.get("/v1/consent/{profile_id}", tags=["consent"], summary="Merged consent as notify applies it")
async def get_consent(profile_id: str, notify: NotifyContext = Depends(ctx),
                      _: Any = Depends(require_scope("messages:read"))) -> dict[str, Any]:
    profile = await notify.profiles.get(profile_id)
    consent = merge_consent(profile, await notify.store.consent_rows(profile_id))
    return {"profileId": profile_id, "subscribed": dict(consent.subscribed),
            "unsubscribedGroups": {k: sorted(v) for k, v in consent.unsubscribed_groups.items()}}


@router.put("/v1/consent/{profile_id}", tags=["consent"], summary="Subscribe or unsubscribe a customer")
async def put_consent(profile_id: str, body: ConsentIn, notify: NotifyContext = Depends(ctx),
                      _: Any = Depends(require_scope("messages:write"))) -> dict[str, Any]:
    profile = await notify.profiles.get(profile_id)
    await notify.change_consent(profile_id=profile_id, user_id=(profile or {}).get("user_id"), channel=body.channel,
                                group=body.group, subscribed=body.subscribed, source="api")
    return await get_consent(profile_id, notify)


# ---- provider feedback --------------------------------------------------------------------------------
class ProviderEventIn(BaseModel):
    messageId: str = Field(min_length=1, max_length=200)
    event: Literal["delivered", "bounced", "complained"]
    bounceType: Literal["hard", "soft"] = "hard"
    detail: str = Field(default="", max_length=2000)


@router.post("/v1/feedback/provider", tags=["feedback"], status_code=202,
             summary="Delivery receipts from an email/SMS provider (delivered, bounced, complained)")
async def provider_feedback(body: ProviderEventIn, notify: NotifyContext = Depends(ctx),
                            _: Any = Depends(require_scope("messages:write"))) -> dict[str, Any]:
    row = await notify.store.by_message_id(body.messageId)
    if row is None:
        raise ApiError(404, "message_not_found", f"no message {body.messageId!r}")
    await notify.provider_event(row, body.event, body.bounceType, body.detail)
    return {"status": "accepted"}


# ---- public, signed endpoints ---------------------------------------------------------------------------
def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif;max-width:480px;margin:3em auto'>{body}</body></html>",
        status_code=status)


@public.get("/u/{token}", tags=["public"], response_class=HTMLResponse, summary="Unsubscribe page")
async def unsubscribe_page(token: str, notify: NotifyContext = Depends(ctx)) -> HTMLResponse:
    payload = notify.links.verify(UNSUBSCRIBE, token)
    if payload is None:
        return _page("Invalid link", "<p>This unsubscribe link is not valid.</p>", 400)
    channel = html.escape(str(payload.get("c")))
    action = html.escape(f"/u/{token}", quote=True)
    return _page("Unsubscribe", f"<h2>Unsubscribe</h2><p>Stop marketing {channel} messages to "
                 f"{html.escape(str(payload.get('a') or 'this address'))}?</p>"
                 f"<form method='post' action='{action}'><input type='hidden' name='confirm' value='yes'>"
                 "<button type='submit'>Unsubscribe</button></form>")


@public.post("/u/{token}", tags=["public"], summary="Unsubscribe (RFC 8058 one-click, or the page's form)")
async def unsubscribe(token: str, request: Request, notify: NotifyContext = Depends(ctx)) -> Response:
    payload = notify.links.verify(UNSUBSCRIBE, token)
    if payload is None:
        raise ApiError(400, "invalid_token", "this unsubscribe link is not valid")
    form = parse_qs((await request.body())[:4096].decode(errors="replace"))
    await notify.unsubscribe_from_token(payload)
    if "List-Unsubscribe" in form:  # one-click from a mailbox provider (RFC 8058): no page
        return Response(status_code=200)
    return _page("Unsubscribed", "<h2>You are unsubscribed</h2><p>You will not receive these messages again.</p>")


@public.get("/c/{token}", tags=["public"], summary="Click redirect (records Email Link Clicked)")
async def click(token: str, notify: NotifyContext = Depends(ctx)) -> Response:
    payload = notify.links.verify(CLICK, token)
    if payload is None or not str(payload.get("u", "")).startswith(("http://", "https://")):
        raise ApiError(400, "invalid_token", "this link is not valid")
    url = str(payload["u"])
    await notify.engagement("Email Link Clicked", str(payload.get("m")), url=url)
    return RedirectResponse(url, status_code=302)


@public.get("/o/{token}.gif", tags=["public"], summary="Open-tracking pixel (records Email Opened)")
async def open_pixel(token: str, notify: NotifyContext = Depends(ctx)) -> Response:
    payload = notify.links.verify(OPEN, token)
    if payload is not None:
        await notify.engagement("Email Opened", str(payload.get("m")))
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store, max-age=0"})
