/*! loyalist.js - storefront tracker for Loyalist ingest (Segment-compatible calls). No dependencies.
 *
 * <script src="https://INGEST/sdk/loyalist.js" data-write-key="KEY" data-require-consent="true" async></script>
 * loyalist.page(); loyalist.track("Product Added", {...}); loyalist.identify("user-1", {email: "..."});
 * loyalist.alias("user-1"); loyalist.reset(); loyalist.consent(true|false); loyalist.flush();
 *
 * Calls queue in localStorage (an offline queue surviving reloads) and are sent in batches to /v1/batch
 * every flushInterval ms or flushAt calls, retried with exponential backoff, and beaconed on pagehide.
 * A message stays queued until ingest acknowledged it; resends are harmless (ingest deduplicates by messageId).
 */
(function (w, d) {
  "use strict";
  var VERSION = "1.0.0";
  var PREFIX = "lo_";
  var pending = w.loyalist && w.loyalist.length ? w.loyalist.slice() : [];
  var cfg = { writeKey: "", apiHost: "", path: "/v1/batch", flushAt: 20, flushInterval: 2000, maxQueue: 1000,
              requireConsent: false, cookieDomain: "", cookieDays: 365 };
  var held = [];          // calls made before consent: memory only, nothing stored or sent
  var timer = null, inFlight = false, inFlightIds = [], failures = 0, retryAt = 0;
  var BEACON_GRACE_MS = 10000;  // a beaconed call is not re-sent by fetch before this (it is likely delivered)

  // ---- storage: localStorage with a cookie copy of the anonymous id ------------------------------------
  function lsGet(k) { try { return w.localStorage.getItem(PREFIX + k); } catch (e) { return null; } }
  function lsSet(k, v) { try { w.localStorage.setItem(PREFIX + k, v); } catch (e) { /* private mode */ } }
  function lsDel(k) { try { w.localStorage.removeItem(PREFIX + k); } catch (e) { /* ignore */ } }
  function cookieGet(k) {
    var m = d.cookie.match(new RegExp("(?:^|; )" + PREFIX + k + "=([^;]*)"));
    return m ? decodeURIComponent(m[1]) : null;
  }
  function cookieSet(k, v, days) {
    var c = PREFIX + k + "=" + encodeURIComponent(v) + "; path=/; SameSite=Lax; max-age=" + days * 86400;
    if (cfg.cookieDomain) c += "; domain=" + cfg.cookieDomain;
    if (w.location.protocol === "https:") c += "; Secure";
    d.cookie = c;
  }
  function json(k, fallback) { try { return JSON.parse(lsGet(k)) || fallback; } catch (e) { return fallback; } }

  function uuid() {
    if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID();
    var b = new Uint8Array(16); w.crypto.getRandomValues(b);
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function consented() { return !cfg.requireConsent || lsGet("consent") === "granted"; }

  function anonymousId() {
    var id = cookieGet("anon_id") || lsGet("anon_id");
    if (!id) id = uuid();
    // Both copies: the cookie survives localStorage clearing, localStorage survives cookie expiry/ITP caps.
    cookieSet("anon_id", id, cfg.cookieDays); lsSet("anon_id", id);
    return id;
  }

  // ---- building messages ----------------------------------------------------------------------------
  function pageContext() {
    var l = w.location;
    return { path: l.pathname, referrer: d.referrer, search: l.search, title: d.title, url: l.href };
  }
  function message(type, fields) {
    var m = { type: type, messageId: uuid(), timestamp: new Date().toISOString(), anonymousId: anonymousId(),
              context: { library: { name: "loyalist.js", version: VERSION }, page: pageContext(),
                         userAgent: navigator.userAgent, locale: navigator.language,
                         screen: { width: w.screen.width, height: w.screen.height } } };
    var userId = lsGet("user_id");
    if (userId) m.userId = userId;
    var traits = json("traits", null);
    if (traits && type !== "identify") m.context.traits = traits;
    for (var k in fields) if (fields[k] !== undefined) m[k] = fields[k];
    return m;
  }

  function enqueue(type, fields) {
    if (!consented()) {
      if (lsGet("consent") !== "denied" && held.length < 100) held.push([type, fields]);
      return;
    }
    var q = json("queue", []);
    q.push(message(type, fields));
    if (q.length > cfg.maxQueue) q = q.slice(q.length - cfg.maxQueue);  // bounded: drop the oldest
    lsSet("queue", JSON.stringify(q));
    if (q.length >= cfg.flushAt) flush(); else schedule(cfg.flushInterval);
  }

  // ---- sending ----------------------------------------------------------------------------------------
  function endpoint() { return cfg.apiHost.replace(/\/$/, "") + cfg.path; }
  function body(batch) {
    // text/plain keeps the request "simple" (no CORS preflight) and is what sendBeacon can send.
    var clean = batch.map(function (m) { var c = {}; for (var k in m) if (k !== "_beaconed") c[k] = m[k]; return c; });
    return JSON.stringify({ batch: clean, sentAt: new Date().toISOString(), writeKey: cfg.writeKey });
  }
  function schedule(ms) {
    if (timer) return;
    timer = setTimeout(function () { timer = null; flush(); }, Math.max(ms, retryAt - Date.now(), 0));
  }
  function acknowledge(ids) {
    var q = json("queue", []);
    lsSet("queue", JSON.stringify(q.filter(function (m) { return ids.indexOf(m.messageId) < 0; })));
  }
  function backoff(retryAfterS) {
    failures += 1;
    var delay = Math.min(60000, 1000 * Math.pow(2, failures - 1)) * (0.5 + Math.random() / 2);
    if (retryAfterS) delay = Math.max(delay, retryAfterS * 1000);
    retryAt = Date.now() + delay;
    schedule(delay);
  }

  function flush() {
    if (!cfg.writeKey || inFlight || !consented()) return Promise.resolve(false);
    var q = json("queue", []);
    if (!q.length) return Promise.resolve(true);
    if (navigator.onLine === false) { return Promise.resolve(false); }  // the "online" listener resumes
    var batch = [], size = 0, now = Date.now(), later = false;
    for (var i = 0; i < q.length && batch.length < 100; i++) {
      if (q[i]._beaconed && now - q[i]._beaconed < BEACON_GRACE_MS) { later = true; continue; }
      size += JSON.stringify(q[i]).length;
      if (size > 400000) break;
      batch.push(q[i]);
    }
    if (!batch.length) { if (later) schedule(BEACON_GRACE_MS); return Promise.resolve(false); }
    var ids = batch.map(function (m) { return m.messageId; });
    inFlight = true; inFlightIds = ids;
    return fetch(endpoint(), { method: "POST", body: body(batch), keepalive: size < 60000,
                               headers: { "Content-Type": "text/plain" }, credentials: "omit" })
      .then(function (res) {
        inFlight = false; inFlightIds = [];
        if (res.status === 429 || res.status >= 500) {
          backoff(parseInt(res.headers.get("Retry-After") || "0", 10));
          return false;
        }
        // 2xx: stored. 4xx: these messages can never succeed (a 400 kept the batch's valid ones).
        failures = 0; retryAt = 0;
        acknowledge(ids);
        if (json("queue", []).length) schedule(0);
        return true;
      }, function () { inFlight = false; inFlightIds = []; backoff(0); return false; });
  }

  function beacon() {
    // The page is going away: hand what is queued to the browser. It stays in the queue until a fetch is
    // acknowledged on a later page; the duplicate is harmless (same messageId).
    var q = json("queue", []);
    if (!q.length || !cfg.writeKey || !navigator.sendBeacon || !consented()) return;
    // Calls in an unfinished fetch are left to it (a keepalive fetch outlives the page).
    var fresh = q.filter(function (m) { return !m._beaconed && inFlightIds.indexOf(m.messageId) < 0; }).slice(0, 100);
    if (!fresh.length) return;
    if (navigator.sendBeacon(endpoint(), new Blob([body(fresh)], { type: "text/plain" }))) {
      var at = Date.now();
      fresh.forEach(function (m) { m._beaconed = at; });
      lsSet("queue", JSON.stringify(q));
    }
  }

  // ---- public API -------------------------------------------------------------------------------------
  var api = {
    VERSION: VERSION,
    load: function (writeKey, options) {
      cfg.writeKey = writeKey;
      for (var k in options || {}) cfg[k] = options[k];
      if (consented()) { anonymousId(); schedule(0); }
      return api;
    },
    page: function (name, properties) {
      if (typeof name === "object") { properties = name; name = undefined; }
      var p = pageContext(), props = { path: p.path, referrer: p.referrer, search: p.search, title: p.title, url: p.url };
      for (var k in properties || {}) props[k] = properties[k];
      enqueue("page", { name: name || d.title, properties: props });
    },
    track: function (event, properties) { enqueue("track", { event: event, properties: properties || {} }); },
    identify: function (userId, traits) {
      if (typeof userId === "object" && userId !== null) { traits = userId; userId = undefined; }
      if (!consented()) { enqueue("identify", { userId: userId, traits: traits || {} }); return; }
      if (userId) lsSet("user_id", String(userId));
      var merged = json("traits", {});
      for (var k in traits || {}) merged[k] = traits[k];
      lsSet("traits", JSON.stringify(merged));
      enqueue("identify", { traits: merged });
    },
    alias: function (userId, previousId) {
      enqueue("alias", { userId: String(userId), previousId: previousId || lsGet("user_id") || anonymousId() });
    },
    reset: function () {
      lsDel("user_id"); lsDel("traits"); lsDel("anon_id");
      cookieSet("anon_id", "", -1);
      if (consented()) anonymousId();
    },
    consent: function (granted) {
      lsSet("consent", granted ? "granted" : "denied");
      var calls = held; held = [];
      if (!granted) { lsDel("queue"); cookieSet("anon_id", "", -1); lsDel("anon_id"); return; }
      anonymousId();
      calls.forEach(function (c) {
        if (c[0] === "identify") { api.identify(c[1].userId, c[1].traits); } else { enqueue(c[0], c[1]); }
      });
      schedule(0);
    },
    flush: flush,
    anonymousId: function () { return consented() ? anonymousId() : null; },
    user: function () { return { userId: lsGet("user_id"), anonymousId: api.anonymousId(), traits: json("traits", {}) }; },
    queued: function () { return json("queue", []).length; }
  };

  w.addEventListener("pagehide", beacon);
  d.addEventListener("visibilitychange", function () { if (d.visibilityState === "hidden") beacon(); });
  w.addEventListener("online", function () { failures = 0; retryAt = 0; schedule(0); });

  w.loyalist = api;
  var tag = d.currentScript;
  if (tag && tag.getAttribute("data-write-key")) {
    api.load(tag.getAttribute("data-write-key"), {
      apiHost: tag.getAttribute("data-api-host") || tag.src.replace(/\/sdk\/loyalist\.js.*$|\/[^/]*\.js.*$/, ""),
      requireConsent: tag.getAttribute("data-require-consent") === "true"
    });
  }
  // Calls made through the snippet stub before this file loaded: window.loyalist = [["page"], ...].
  pending.forEach(function (call) { if (api[call[0]]) api[call[0]].apply(api, call.slice(1)); });
})(window, document);
