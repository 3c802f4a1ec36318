"""mitmproxy hook adapters, one concern each; ordered in `runtime.chain`."""
