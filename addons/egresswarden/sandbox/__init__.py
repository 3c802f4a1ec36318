"""`warden sandbox`: run an agent in bubblewrap so that its only way out is Warden.

    protocol   the admin-socket messages shared by Warden (runtime/admin.py) and the launcher
    profiles   a rule-file profile -> concrete paths, environment and command stubs
    bwrap      the bubblewrap argument list (mount plan, namespaces, environment)
    limits     memory / processes / CPU: cgroup v2, cgroup v1 or rlimits
    bridge     the outer relay: sandbox unix socket -> Warden's listen port
    inner      pid 1 inside the sandbox (stdlib only): loopback relay, CMD, signals, status
    launcher   puts it together: embedded or attached Warden, lifetime, audit
"""
