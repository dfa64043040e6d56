"""Lowering descriptors, one folder per runtime (installed as `pytest_rkv.descriptors`)."""
