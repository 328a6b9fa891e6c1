"""The stop engine: trigger rules, execution state machine, guardrails, event store, exchange port."""
