"""Nothing every tier needs. Each tier has its own conftest (tests/unit, tests/reference, tests/integration);
support code for tests and benchmarks lives in tools/samserve_dev."""
