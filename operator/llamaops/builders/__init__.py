"""Pure builders: spec in, manifest dicts out. No I/O; unit-tested by value."""
