"""Prometheus metrics (served at /metrics)."""

from prometheus_client import Counter, Gauge

EVENTS_PUBLISHED = Counter("mora_events_published_total", "Session events published", ["kind"])
SUBSCRIPTIONS = Gauge("mora_subscriptions_active", "sessionProgress subscriptions being served")
SUBSCRIBER_CATCH_UPS = Counter(
    "mora_subscriber_catch_ups_total", "Subscribers caught up from the replay log", ["reason"]
)
STALLED_JOBS_RETRIED = Counter(
    "mora_stalled_jobs_retried_total", "Jobs retried after a lost worker"
)
ORPHANS_REQUEUED = Counter("mora_orphaned_sessions_requeued_total", "Sessions re-queued")
EVENT_EXECUTIONS = Counter(
    "mora_subscription_event_executions_total",
    "Subscription event deliveries by whether the execution result was shared",
    ["shared"],
)
RESPONSE_CACHE_LOOKUPS = Counter(
    "mora_response_cache_lookups_total", "Response cache lookups by outcome", ["outcome"]
)
PERSISTED_QUERY_LOOKUPS = Counter(
    "mora_persisted_query_lookups_total", "Persisted query lookups by outcome", ["outcome"]
)
