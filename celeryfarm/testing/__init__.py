"""Stand-ins and helpers for running celeryfarm without Katana: tests, demos, benchmarks."""
