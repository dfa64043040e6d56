"""The stock-vLLM backend (`--rkv-backend=vllm`). See driver.py.

Modules: build (which vLLM, which device), model (tiny generated model or a given one),
server (argv/env, launch), geometry (the 80-block pool check), events (KV event stream),
metrics (/metrics parsing), hashing (vLLM's block hashes on the client side).
"""
