"""What happened: the Outcome of each flow, and the sinks that read it (audit journal, metrics, alerts)."""
