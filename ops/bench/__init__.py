"""Benchmarks: each module with a `main()` runs as `python -m ops.bench.<name>` (e2e, campaign,
projector, smpp). They measure and print; they are not tests and assert nothing."""
