"""The pure policy engine: rule model, loader/validator, compiler, matcher, decision.

Nothing in this package imports mitmproxy or does network I/O. It reads the files it is
handed and answers questions with immutable values, so it can be unit-tested, benchmarked
and used by the CLI (`warden check`, `warden explain`) without a proxy.

Stages (each module does one):
    yamlsource  YAML text -> plain values + a map from value path to line number
    validate    plain values -> model (JSON Schema + semantic checks, file:line errors)
    compiler    model -> RuleSet (immutable, indexed by host, suffix and prefix length)
    decide      RuleSet + RequestFacts -> Decision
"""
