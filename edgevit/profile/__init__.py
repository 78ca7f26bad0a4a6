"""Latency on devices: the timing protocol (``timing``), the measuring worker (``worker``, which
loads artifacts through ``edgevit.runtimes``), remote and isolated runs (``remote``), device
profiles (``profiles``), roofline estimates (``estimate``), per-layer profiles (``layers``), the
results file (``results``), measuring a model's bundles (``profiler``) and reports (``report``).
Bundles come from the profile flow (``edgevit.pipeline.profile``); this package never exports."""
