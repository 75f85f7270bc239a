import time, httpx
from tests.notify.conftest import launch_notify, produce_requests, put_profiles, profile_doc, request_doc

def test_measure(stack_settings, api_headers):
    svc = launch_notify(stack_settings, "measure", LOYALIST_NOTIFY_LEASE_S="60")
    n = 300
    tag = f"meas{time.time_ns() % 10**8}"
    emails = [f"{tag}-{i}@example.test" for i in range(n)]
    profiles = [profile_doc(f"p-{tag}-{i}", e) for i, e in enumerate(emails)]
    put_profiles(stack_settings, *profiles)
    reqs = [request_doc(p["profile_id"], "welcome_1", category="transactional") for p in profiles]
    t0 = time.monotonic()
    produce_requests(stack_settings, *reqs)
    t1 = time.monotonic()
    url = f"http://127.0.0.1:{stack_settings.smtp_sink_http_port}/messages"
    i = 0
    while i < n and time.monotonic() - t0 < 300:
        if httpx.get(url, params={"to": emails[i]}, timeout=30).json():
            i += 1
        else:
            time.sleep(0.2)
    # the last ones may finish in any order: wait for all
    while time.monotonic() - t0 < 300 and not all(httpx.get(url, params={"to": e}, timeout=30).json() for e in emails[-20:]):
        time.sleep(0.2)
    t2 = time.monotonic()
    got = sum(1 for e in emails if httpx.get(url, params={"to": e}, timeout=30).json())
    metrics = httpx.get(f"{svc.url}/metrics").text
    print(f"\nMEASURE produced {n} in {t1-t0:.1f}s; all {got} in sink after {t2-t0:.1f}s => {got/(t2-t0):.1f} msg/s")
    for line in metrics.splitlines():
        if line.startswith("loyalist_notify_provider_call_duration_seconds_sum") or line.startswith("loyalist_notify_provider_call_duration_seconds_count"):
            print("MEASURE", line)
    svc.kill()
