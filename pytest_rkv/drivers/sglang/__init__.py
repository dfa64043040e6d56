"""The `sglang` backend: a real SGLang server, started from its own interpreter.

* `environment.py`: which Python runs SGLang, and the CPU stand-ins it needs (declared in
  the row).
* `model.py`: the generated tiny model and tokenizer.
* `server.py`: the command line, the environment, the supervised launch.
* `driver.py`: the `Driver` over SGLang's native HTTP API.

SGLang's KV event stream has vLLM's wire format, so `drivers/vllm/events.py` decodes it,
and `drivers/vllm/metrics.py` parses its Prometheus page.
"""
