"""The released suite: one test module per contract area (installed as `pytest_rkv.suite`)."""
