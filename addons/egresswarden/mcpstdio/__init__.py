"""`warden mcp stdio`: local (stdio) MCP servers governed by the same engine as HTTP MCP.

    framing   newline-delimited JSON lines with a hard length cap
    launch    argv/env/cwd of a declared server; ${secret:NAME}; the `warden sandbox` seam
    records   the session's hash-chained `mcp` audit records and alerts
    relay     the two-way relay that decides every message (see its docstring for each case)
"""
