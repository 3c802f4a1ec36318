"""The running process: rule store, resolver, per-flow context, fail-closed dispatch, the chain and the master."""
