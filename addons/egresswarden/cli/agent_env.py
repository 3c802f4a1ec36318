"""`warden agent-env --agent ID`: the complete client environment for one agent.

Every variable a common client reads is set, from two values only: the proxy URL and
the trust bundle. Why each one is there (each was seen failing without it):

* ``HTTPS_PROXY``/``https_proxy``/``HTTP_PROXY``/``http_proxy``: curl reads only the
  lower-case ``http_proxy`` (and prefers lower-case ``https_proxy``), Python and git read
  either. Both spellings come from ONE shell variable, so a later change of identity is
  made by re-running this command, never by editing one spelling and silently keeping the
  other agent's identity in the other.
* ``ALL_PROXY``/``all_proxy``: the fallback of curl (every scheme without its own
  variable), reqwest- and Go-based tools. Pointing it at Warden means a client that only
  knows the fallback reaches Warden (which governs or refuses) rather than going direct or
  through a stale proxy from the user's shell.
* ``NO_PROXY``/``no_proxy``: loopback only; everything else must go through Warden.
* ``SSL_CERT_FILE`` (OpenSSL default: Python ``ssl``/urllib, httpx, Go, Ruby),
  ``CURL_CA_BUNDLE`` (curl: it uses ``SSL_CERT_DIR`` *instead of* ``SSL_CERT_FILE`` when
  the former is set, and ``CURL_CA_BUNDLE`` before both), ``REQUESTS_CA_BUNDLE``
  (requests ignores ``SSL_CERT_FILE``), ``PIP_CERT``, ``GIT_SSL_CAINFO`` (git ignores
  ``SSL_CERT_FILE``), ``NODE_EXTRA_CA_CERTS`` (added to Node's built-in roots).
* ``SSL_CERT_DIR``: many images and distributions export it (``/etc/ssl/certs``); curl
  then ignores ``SSL_CERT_FILE``, and httpx or other OpenSSL users may look there first.
  It is set to the bundle's own directory (keep the bundle alone there, never next to the
  CA key: `make run` uses certs/agent/), which replaces whatever the shell had with a
  directory that holds nothing but the bundle (no hashed entries: lookups there find
  nothing and fall back to the bundle file every client above is given explicitly).
* ``NODE_USE_ENV_PROXY=1``: Node 24 (and 22.21+) then honour ``HTTPS_PROXY`` in ``fetch``
  and ``https``; Node 20 ignores it (use undici's ``EnvHttpProxyAgent``, which reads the
  same variables).

The token is printed only when it is given (``--token`` or ``--token-file``). Without
one, each format refers to it indirectly: the shell output reads ``$WARDEN_TOKEN`` when
evaluated, compose interpolates ``${WARDEN_AGENT_TOKEN}`` from ``compose/.env``, and the
Kubernetes env reads a Secret.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from urllib.parse import quote

import yaml

from egresswarden.cli.ca import BUNDLE_NAME, DEFAULT_CONFDIR
from egresswarden.cli.token import agent_id_problem

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
# (variable, which clients read it); all get the bundle path.
CA_VARS = (
    ("SSL_CERT_FILE", "OpenSSL default: Python ssl/urllib, httpx, Go, Ruby"),
    ("SSL_CERT_DIR", "replaces an inherited one, which curl would use instead of SSL_CERT_FILE"),
    ("CURL_CA_BUNDLE", "curl (checked before SSL_CERT_DIR and SSL_CERT_FILE)"),
    ("REQUESTS_CA_BUNDLE", "requests (ignores SSL_CERT_FILE)"),
    ("PIP_CERT", "pip"),
    ("GIT_SSL_CAINFO", "git (ignores SSL_CERT_FILE)"),
    ("NODE_EXTRA_CA_CERTS", "Node.js, added to its built-in roots"),
)
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1"
DEFAULT_PROXY = "127.0.0.1:8080"
TOKEN_PLACEHOLDER = "REPLACE-WITH-AGENT-TOKEN"
# Where `make run` writes the bundle: a directory of its own (SSL_CERT_DIR points at the
# bundle's directory, which should never be the one holding the CA private key).
AGENT_BUNDLE_DIR = "agent"
K8S_SECRET_KEY = "token"


class AgentEnvError(Exception):
    """Bad arguments (printed, exit 2)."""


def proxy_url(agent: str, token: str, proxy: str) -> str:
    # Tokens from `warden token` are URL-safe already; quoting keeps any other token
    # (':' '@' '/' '%') from changing where the URL points or who it names.
    return f"http://{agent}:{quote(token, safe='')}@{proxy}"


def ca_values(bundle: str) -> dict[str, str]:
    directory = str(Path(bundle).parent)
    return {name: directory if name == "SSL_CERT_DIR" else bundle for name, _ in CA_VARS}


def render_shell(agent: str, token: str | None, proxy: str, no_proxy: str, bundle: str) -> str:
    q = shlex.quote
    lines = [f"# Warden agent environment for agent {agent!r} via {proxy} (from `warden agent-env`).",
             "# Load it with: eval \"$(warden agent-env ...)\". To change agent or token, run it again:",
             "# every proxy variable below is derived from WARDEN_PROXY_URL, so none can keep an old identity."]
    if token is None:
        lines.append(': "${WARDEN_TOKEN:?export WARDEN_TOKEN=<the agent token> first (warden token ID makes one)}"')
        lines.append(f'WARDEN_PROXY_URL="http://{agent}:${{WARDEN_TOKEN}}@{proxy}"')
    else:
        lines.append(f"WARDEN_PROXY_URL={q(proxy_url(agent, token, proxy))}")
    lines.append("export " + " ".join(f'{v}="$WARDEN_PROXY_URL"' for v in PROXY_VARS))
    lines.append("export " + " ".join(f"{v}={q(no_proxy)}" for v in NO_PROXY_VARS))
    lines.append(f"WARDEN_CA_BUNDLE={q(bundle)}")
    for name, why in CA_VARS:
        # The same values as ca_values(), spelled through the one variable.
        value = '"${WARDEN_CA_BUNDLE%/*}"' if name == "SSL_CERT_DIR" else '"$WARDEN_CA_BUNDLE"'
        lines.append(f"export {name}={value}  # {why}")
    lines.append("export NODE_USE_ENV_PROXY=1  # Node 24+/22.21+: fetch and https use HTTPS_PROXY (Node 20: undici EnvHttpProxyAgent)")
    return "\n".join(lines) + "\n"


def env_values(agent: str, token_ref: str, proxy: str, no_proxy: str, bundle: str) -> dict[str, str]:
    url = f"http://{agent}:{token_ref}@{proxy}"
    out = dict.fromkeys(PROXY_VARS, url)
    out |= dict.fromkeys(NO_PROXY_VARS, no_proxy)
    out |= ca_values(bundle)
    out["NODE_USE_ENV_PROXY"] = "1"
    return out


def render_dotenv(agent: str, token: str | None, proxy: str, no_proxy: str, bundle: str) -> str:
    ref = quote(token, safe="") if token is not None else TOKEN_PLACEHOLDER
    header = [f"# Warden agent environment for agent {agent!r} via {proxy} (from `warden agent-env --format dotenv`)."]
    if token is None:
        header.append(f"# Replace {TOKEN_PLACEHOLDER} (6 times) with the agent token, or re-run with --token-file.")
    values = env_values(agent, ref, proxy, no_proxy, bundle)
    # Single quotes: no interpolation in docker compose, python-dotenv or systemd EnvironmentFile.
    return "\n".join(header + [f"{k}='{v}'" for k, v in values.items()]) + "\n"


def render_compose(agent: str, token: str | None, proxy: str, no_proxy: str, bundle: str) -> str:
    # Compose interpolates ${VAR} in the file: without a token every variable reads the
    # one WARDEN_AGENT_TOKEN from compose/.env; a given token has its '$' doubled.
    # Without a token the agent id is read from compose/.env as well (default: --agent), so
    # the one .env file decides who the agent is, for every variable at once.
    if token is None:
        ref, who = "${WARDEN_AGENT_TOKEN:?set WARDEN_AGENT_TOKEN in compose/.env}", f"${{WARDEN_AGENT_ID:-{agent}}}"
    else:
        ref, who = quote(token, safe="").replace("$", "$$"), agent
    body = yaml.safe_dump({"environment": env_values(who, ref, proxy, no_proxy, bundle)}, sort_keys=False,
                          default_flow_style=False, width=1000)
    return (f"# Warden agent environment for agent {agent!r} via {proxy}: paste under services.<your agent>:\n"
            "# (from `warden agent-env --format compose`; mount the bundle's directory read-only)\n" + body)


def render_k8s(agent: str, token: str | None, proxy: str, no_proxy: str, bundle: str) -> str:
    secret = f"warden-agent-{agent}"
    # $(VAR) expands earlier entries of the same env list, so the token is read once from
    # a Secret and the URL built once; every proxy variable refers to that one URL.
    env: list[dict[str, object]] = [
        {"name": "WARDEN_AGENT_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": K8S_SECRET_KEY}}},
        {"name": "WARDEN_PROXY_URL", "value": f"http://{agent}:$(WARDEN_AGENT_TOKEN)@{proxy}"},
    ]
    values = env_values(agent, "$(WARDEN_AGENT_TOKEN)", proxy, no_proxy, bundle)
    for name, value in values.items():
        env.append({"name": name, "value": "$(WARDEN_PROXY_URL)" if name in PROXY_VARS else value})
    made = (f"kubectl create secret generic {secret} --from-literal={K8S_SECRET_KEY}={shlex.quote(token)}"
            if token is not None else
            f"kubectl create secret generic {secret} --from-file={K8S_SECRET_KEY}=<file holding the token>")
    return (f"# Warden agent environment for agent {agent!r} via {proxy}: the container's env: list.\n"
            f"# The token comes from a Secret (URL-safe tokens only: it is spliced into a URL):\n#   {made}\n"
            + yaml.safe_dump({"env": env}, sort_keys=False, default_flow_style=False, width=1000))


RENDERERS = {"shell": render_shell, "dotenv": render_dotenv, "compose": render_compose, "k8s": render_k8s}


def read_token(args: argparse.Namespace) -> str | None:
    if args.token is not None and args.token_file is not None:
        raise AgentEnvError("give --token or --token-file, not both")
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AgentEnvError(f"cannot read --token-file {args.token_file}: {e.__class__.__name__}") from None
        if not token:
            raise AgentEnvError(f"--token-file {args.token_file} is empty")
        return token
    if args.token is not None and not args.token:
        raise AgentEnvError("--token is empty")
    return str(args.token) if args.token is not None else None


def cmd_agent_env(args: argparse.Namespace) -> int:
    try:
        problem = agent_id_problem(args.agent)
        if problem:
            raise AgentEnvError(problem)
        token = read_token(args)
    except AgentEnvError as e:
        print(f"warden agent-env: {e}", file=sys.stderr)
        return 2
    default_bundle = Path(DEFAULT_CONFDIR) / AGENT_BUNDLE_DIR / BUNDLE_NAME
    bundle = Path(args.ca_bundle) if args.ca_bundle else default_bundle
    if args.format in ("shell", "dotenv"):
        # A relative path would change meaning with the agent's working directory.
        bundle = bundle.resolve()
        if not bundle.is_file():
            print(f"warden agent-env: note: {bundle} does not exist yet; create it with "
                  f"`warden ca bundle --out {bundle}`", file=sys.stderr)
        if (bundle.parent / "mitmproxy-ca.pem").exists():
            print(f"warden agent-env: warning: {bundle.parent} holds the CA private key and SSL_CERT_DIR points "
                  "there; write the bundle into a directory of its own (e.g. certs/agent/)", file=sys.stderr)
    elif not args.ca_bundle:
        bundle = Path("/etc/warden-ca/ca-bundle.pem")  # where compose and Kubernetes mount it
    proxy = args.proxy or ({"compose": "warden:8080", "k8s": "$(WARDEN_SERVICE_HOST):8080"}
                           .get(args.format, DEFAULT_PROXY))
    sys.stdout.write(RENDERERS[args.format](args.agent, token, proxy, args.no_proxy, str(bundle)))
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent-env", help="print the complete client environment for an agent (shell, compose, k8s, .env)")
    p.add_argument("--agent", required=True, metavar="ID", help="agent id (as in the rules)")
    p.add_argument("--token", metavar="T", help="the agent's token (printed into the output; default: a reference)")
    p.add_argument("--token-file", metavar="F", help="read the token from this file")
    p.add_argument("--proxy", metavar="HOST:PORT",
                   help=f"Warden's address as the agent sees it (default: {DEFAULT_PROXY}; compose: warden:8080; "
                        "k8s: $(WARDEN_SERVICE_HOST):8080)")
    p.add_argument("--format", choices=tuple(RENDERERS), default="shell", help="output format (default: shell)")
    p.add_argument("--ca-bundle", metavar="PATH",
                   help=f"trust bundle from `warden ca bundle`, alone in its directory (default: "
                        f"{DEFAULT_CONFDIR}/{AGENT_BUNDLE_DIR}/{BUNDLE_NAME}; "
                        "compose/k8s: /etc/warden-ca/ca-bundle.pem)")
    p.add_argument("--no-proxy", default=DEFAULT_NO_PROXY, metavar="LIST",
                   help=f"NO_PROXY value (default: {DEFAULT_NO_PROXY})")
    p.set_defaults(func=cmd_agent_env)
