"""The value figure: what Resident KV Claims save in a multi-turn agent workload (run.py)."""
