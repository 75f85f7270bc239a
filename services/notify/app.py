"""Notify: wiring settings → adapters → notifier → consumer, scheduler and API."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from loyalist.events import utcnow
from loyalist.http import create_service_app
from loyalist.service import Resources
from loyalist.settings import Settings
from services.notify.adapters.email import SmtpSender
from services.notify.adapters.profiles import ProfileReader
from services.notify.adapters.sms import SmsSender
from services.notify.adapters.webhook import WebhookSender
from services.notify.api import public, router
from services.notify.builtin_templates import BUILTIN_SMS, BUILTIN_TEMPLATES
from services.notify.config import NotifyConfig, process_incarnation
from services.notify.context import NotifyContext
from services.notify.delivery import Notifier
from services.notify.domain.signing import derive_key
from services.notify.domain.templates import Template
from services.notify.feedback import Feedback
from services.notify.links import LinkSigner
from services.notify.store import NotifyStore
from services.notify.streams import RequestConsumer, Scheduler


async def seed_templates(store: NotifyStore) -> None:
    now = utcnow()
    for template in BUILTIN_TEMPLATES:
        await store.seed_template(template, now)
    for template_id, body in BUILTIN_SMS.items():
        await store.seed_template(Template(id=template_id, channel="sms", name=f"{template_id} (SMS)", text=body,
                                           builtin=True), now)


def create_app(settings: Settings | None = None, config: NotifyConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or NotifyConfig()
    state: dict[str, object] = {}

    async def on_start(res: Resources, app: FastAPI) -> None:
        clock = utcnow
        store = NotifyStore(res.session)
        await seed_templates(store)
        http = httpx.AsyncClient(timeout=config.webhook_timeout_s, follow_redirects=False)
        links = LinkSigner(settings.signing_secret, config.public_url or settings.service_url("notify"))
        profiles = ProfileReader(settings, res.redis)
        feedback = Feedback(settings, res.producer, clock)
        instance = config.owner_prefix(settings.notify_port)
        smtp = SmtpSender(host=settings.smtp_host, port=settings.smtp_port, domain=config.mail_domain,
                          username=config.smtp_username, password=config.smtp_password,
                          use_tls=config.smtp_use_tls, start_tls=config.smtp_start_tls,
                          timeout_s=config.smtp_timeout_s)
        notifier = Notifier(
            settings, config, store, profiles, feedback, links,
            email=smtp,
            sms=SmsSender(http, base_url=config.sms_base_url, account_sid=config.sms_account_sid,
                          auth_token=config.sms_auth_token, sender=config.sms_from),
            webhook=WebhookSender(http, key=derive_key(settings.signing_secret, "webhook")),
            # The owner names this process incarnation: a restarted process must not mistake a dead one's
            # claims for its own.
            owner=f"{instance}/{process_incarnation()}", clock=clock,
        )
        consumer = RequestConsumer(settings, config, notifier, instance_id=instance)
        scheduler = Scheduler(config, notifier, clock, on_tick=consumer.refresh_dlq_size)
        app.state.notify = NotifyContext(settings, config, store, profiles, notifier, links, feedback, res.producer,
                                         clock)
        await consumer.start()
        await scheduler.start()
        state.update(http=http, consumer=consumer, scheduler=scheduler, smtp=smtp)

        async def consumer_check() -> bool:
            return bool(consumer.consumer.assignment()) or not consumer.consumer._closed

        app.state.ready_checks["consumer"] = consumer_check

    async def on_stop(res: Resources, app: FastAPI) -> None:
        for name in ("scheduler", "consumer"):
            component = state.get(name)
            if component is not None:
                await component.stop()  # type: ignore[attr-defined]
        http = state.get("http")
        if isinstance(http, httpx.AsyncClient):
            await http.aclose()
        smtp_sender = state.get("smtp")
        if isinstance(smtp_sender, SmtpSender):
            await smtp_sender.close()

    resources = Resources(settings, "notify", cassandra=True, redis=True, producer=True, on_start=on_start,
                          on_stop=on_stop)
    app = create_service_app(
        "notify", title="Loyalist notify",
        description="Email, SMS and webhooks with consent, frequency caps, quiet hours, idempotent delivery and "
                    "feedback events.",
        lifespan=resources.lifespan,
    )
    app.include_router(router)
    app.include_router(public)
    return app
