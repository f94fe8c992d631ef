"""The top floor: the driver API (``Engine``), live replays, benchmarks and the CLI. The only floor that
starts Ray."""
