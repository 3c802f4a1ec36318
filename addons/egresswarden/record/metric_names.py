"""Every metric Warden exports, by name: dashboards, alert rules and tests import these."""

REQUESTS = "warden_requests"  # counter -> warden_requests_total{agent,decision,reason}
CONNECTS = "warden_connects"  # counter -> warden_connects_total{agent,decision,reason}
BYTES = "warden_bytes"  # counter -> warden_bytes_total{agent,direction}
DECISION_DURATION = "warden_decision_duration_seconds"  # histogram{stage}
UPSTREAM_DURATION = "warden_upstream_duration_seconds"  # histogram
ACTIVE_TUNNELS = "warden_active_tunnels"  # gauge
RULES_LOADED = "warden_rules_loaded"  # gauge
POLICY_INFO = "warden_policy_info"  # gauge{version} = 1
RELOADS = "warden_reloads"  # counter{result}
LAST_RELOAD_SUCCESS = "warden_last_reload_success_timestamp_seconds"  # gauge
AUDIT_QUEUE_DEPTH = "warden_audit_queue_depth"  # gauge
AUDIT_WRITE_FAILURES = "warden_audit_write_failures"  # counter
AUDIT_RECORDS = "warden_audit_records"  # counter
AUDIT_HEALTHY = "warden_audit_healthy"  # gauge 1/0
ALERTS_SENT = "warden_alerts_sent"  # counter{sink}
ALERTS_FAILED = "warden_alerts_failed"  # counter{sink}
ALERTS_SUPPRESSED = "warden_alerts_suppressed"  # counter{cause}
CREDENTIALS_INJECTED = "warden_credentials_injected"  # counter{credential}
SECRET_LEAKS = "warden_secret_leaks"  # counter{agent}
SSRF_REFUSALS = "warden_ssrf_refusals"  # counter{agent}
AUTH_FAILURES = "warden_auth_failures"  # counter{reason}
MCP_CALLS = "warden_mcp_calls"  # counter{agent,server,decision,reason}
HOOK_ERRORS = "warden_hook_errors"  # counter{hook}
TUNNELS_REVOKED = "warden_tunnels_revoked"  # counter{agent,reason}
PROBE_REFUSED = "warden_probe_connections_refused"  # counter: metrics/health connections over the cap
BUFFERED_REQUEST_BYTES = "warden_buffered_request_bytes"  # gauge{agent}: request bodies held in memory
FRONT_DOOR = "warden_front_door_connections"  # counter{path}: fast, mitmproxy, head_timeout, head_too_large, no_head
CLIENT_CONNECTIONS = "warden_client_connections"  # gauge: client connections open now (this process)
MAX_CONNECTIONS = "warden_max_connections"  # gauge: warden_max_connections in force
AGENT_CONNECTIONS = "warden_agent_connections"  # gauge{agent}: connections counted toward each agent's limit
CONNECTIONS_REFUSED = "warden_connections_refused"  # counter{limit}: process, agent
UPSTREAM_TLS_HANDSHAKES = "warden_upstream_tls_handshakes"  # counter{resumed}: "true", "false"

# Names as they appear on the /metrics page (counters gain _total).
EXPORTED = frozenset({
    f"{REQUESTS}_total", f"{CONNECTS}_total", f"{BYTES}_total", DECISION_DURATION, UPSTREAM_DURATION,
    ACTIVE_TUNNELS, RULES_LOADED, POLICY_INFO, f"{RELOADS}_total", LAST_RELOAD_SUCCESS, AUDIT_QUEUE_DEPTH,
    f"{AUDIT_WRITE_FAILURES}_total", f"{AUDIT_RECORDS}_total", AUDIT_HEALTHY, f"{ALERTS_SENT}_total",
    f"{ALERTS_FAILED}_total", f"{ALERTS_SUPPRESSED}_total", f"{CREDENTIALS_INJECTED}_total",
    f"{SECRET_LEAKS}_total", f"{SSRF_REFUSALS}_total", f"{AUTH_FAILURES}_total", f"{MCP_CALLS}_total",
    f"{HOOK_ERRORS}_total", f"{TUNNELS_REVOKED}_total", f"{PROBE_REFUSED}_total", BUFFERED_REQUEST_BYTES,
    f"{FRONT_DOOR}_total", CLIENT_CONNECTIONS, MAX_CONNECTIONS, AGENT_CONNECTIONS, f"{CONNECTIONS_REFUSED}_total",
    f"{UPSTREAM_TLS_HANDSHAKES}_total",
})
