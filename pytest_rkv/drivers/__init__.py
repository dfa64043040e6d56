"""Backends under test. Each is a `Driver` (see base.py), found by name in registry.py."""
