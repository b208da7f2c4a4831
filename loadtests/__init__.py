"""Load tooling of the HTTP service: the Locust users (locustfile.py) and `make loadtest` driver (run.py) with
their payloads, scenarios and objectives; the hardening runs (overload.py, soak.py, faults.py); the fuzzer
(fuzz.py); and the one server launcher (server.py) that tests, benchmarks and load tests share. Run its modules
from the repository root as `python -m loadtests.<name>`."""
