"""Checks: data-quality and guardrail suites (Great Expectations), sequential tests and
the verdict policy. Reads the metrics database through a connection it is handed; imports
nothing from `flows` and only the row schema from `router`."""
