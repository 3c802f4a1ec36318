"""Audit record field names: one constant each, so names stay stable (SIEM parsers rely on them).

The README maps each onto the Elastic Common Schema.
"""

TIME = "time"
EVENT = "event"
SEQ = "seq"
PREV_HASH = "prev_hash"
REQUEST_ID = "request_id"
AGENT = "agent"
AGENT_CLAIMED = "agent_claimed"
IDENTITY = "identity"
CLIENT_IP = "client_ip"
CLIENT_PORT = "client_port"
METHOD = "method"
SCHEME = "scheme"
HOST = "host"
PORT = "port"
PATH = "path"
DECISION = "decision"
REASON = "reason"
RULE_ID = "rule_id"
MESSAGE = "message"
POLICY_VERSION = "policy_version"
INTERCEPTION = "interception"
STATUS = "status"
BYTES_UP = "bytes_up"
BYTES_DOWN = "bytes_down"
DURATION_MS = "duration_ms"
UPSTREAM_IP = "upstream_ip"
CREDENTIAL_IDS = "credential_ids"
ERROR = "error"
EVENTS = "events"
SANDBOX_ID = "sandbox_id"
WEBSOCKET_MESSAGES_UP = "websocket_messages_up"
WEBSOCKET_MESSAGES_DOWN = "websocket_messages_down"
MCP_SERVER = "mcp_server"
MCP_METHOD = "mcp_method"
MCP_TRANSPORT = "mcp_transport"
MCP_TOOL = "mcp_tool"
MCP_RESOURCE = "mcp_resource"
MCP_PROMPT = "mcp_prompt"
MCP_ARGUMENT_KEYS = "mcp_argument_keys"
MCP_ARGUMENT_VALUES = "mcp_argument_values"
MCP_IS_ERROR = "mcp_is_error"
MCP_PROTOCOL_VERSION = "mcp_protocol_version"
MCP_BATCH = "mcp_batch"
MCP_HIDDEN = "mcp_hidden"
MCP_CHANGED_TOOLS = "mcp_changed_tools"
MCP_CHANGED_PARTS = "mcp_changed_parts"  # tool -> the pinned fields that changed
MCP_TOOL_COLLISIONS = "mcp_tool_collisions"
MCP_SUBSTITUTED = "mcp_substituted"
REVOCATION = "revocation"
CARRIED_TLS = "carried_tls"  # tunnel_close: the tunnel carried a TLS session Warden checked
REVOKE_MS = "revoke_ms"

# `connections_refused` (stages/connlimits.py): closures by the process connection bound,
# counted per window instead of one record per connection.
LIMIT = "limit"  # process
MAX_CONNECTIONS = "max_connections"
REFUSED = "refused"  # answered 503 at accept
EVICTED = "evicted"  # closed, no agent identified on them, to make room
CLIENTS = "clients"  # [{client_ip, refused, evicted}], at most 64 addresses, the rest as client_ip "other"
WINDOW_MS = "window_ms"

# `warden sandbox` lifecycle records (runtime/admin.py): sandbox_start / sandbox_refused /
# sandbox_exit. SANDBOX_ID above is on these and on the traffic records of sandboxed agents.
PROFILE = "profile"
COMMAND = "command"
WORKDIR = "workdir"
LIMITS = "limits"
LIMITS_BACKEND = "limits_backend"
EXIT_STATUS = "exit_status"
SIGNAL = "signal"
LIMIT_HIT = "limit_hit"
LAUNCHER_PID = "launcher_pid"

MCP_UNPINNED_TOOLS = "mcp_unpinned_tools"
MCP_SESSION = "mcp_session"  # stdio: one id per `warden mcp stdio` process
MCP_DIRECTION = "mcp_direction"  # stdio: client | server | warden
MCP_REDACTED = "mcp_redacted"  # stdio: secrets redacted from the answer
