"""Public entry point for loading rules: `load_ruleset(rules_dir) -> RuleSet`."""

from __future__ import annotations

from .compiler import compile_model, load_ruleset
from .validate import load_model, rule_files

__all__ = ["compile_model", "load_model", "load_ruleset", "rule_files"]
