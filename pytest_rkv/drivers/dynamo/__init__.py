"""The `dynamo` backend: a Dynamo deployment (KV-routing frontend, mocker workers) on loopback."""
