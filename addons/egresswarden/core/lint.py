"""Warnings about rule sets that load but may not mean what their authors think (pure).

`warden check` prints these; they never stop Warden.
"""

from __future__ import annotations

from .model import TargetKind
from .ruleset import RuleSet


def cidr_name_warnings(rules: RuleSet) -> list[str]:
    """Rule sets that relied on the 0.1 meaning of `cidr` rules.

    Until 0.1 a cidr allow rule also allowed any host name that resolved into it, so Warden
    resolved every name an agent asked for (a DNS exfiltration channel). Since 0.2 a cidr
    rule matches IP literals only; a name needs a host/domain rule (with `addresses:` when it
    lives at a private address)."""
    out: list[str] = []
    model = rules.model
    for agent in model.agents:
        cidr_rules = [r for name in agent.policies for r in model.policies[name].allow
                      if r.target.kind is TargetKind.CIDR]
        if not cidr_rules:
            continue
        compiled = rules.agents[agent.id]
        for name, addresses in rules.hosts_file.items():
            if any(p.hosts and p.hosts.lookup(name) for p in compiled.policies):
                continue
            for rule in cidr_rules:
                net = rule.target.network
                if net is not None and any(ip.version == net.version and ip in net for ip in addresses):
                    out.append(
                        f"{rule.origin}: agent {agent.id!r} reaches {name} (hosts file: {addresses[0]}) only "
                        f"through cidr rule {rule.id!r}; since 0.2 a cidr rule matches IP literals only, so "
                        f"{name} is now refused: add a host rule for it (with addresses: [{net}] if private)")
                    break
    return out


def cidr_notes(rules: RuleSet) -> list[str]:
    """One note per agent with cidr rules (names resolved by DNS cannot be checked offline)."""
    model = rules.model
    out = []
    for agent in model.agents:
        first = next((r for name in agent.policies for r in model.policies[name].allow
                      if r.target.kind is TargetKind.CIDR), None)
        if first is not None:
            out.append(f"{first.origin}: agent {agent.id!r} has cidr rules; since 0.2 they match IP literals only, "
                       f"never host names (a name needs a host/domain rule)")
    return out
