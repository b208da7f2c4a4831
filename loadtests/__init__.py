"""Locust load tests of the HTTP service: users (locustfile.py), payloads, the `make loadtest` driver (run.py)."""
