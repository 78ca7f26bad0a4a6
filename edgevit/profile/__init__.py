"""Latency on devices: the timing protocol (``timing``), the measuring worker and its runtimes
(``runtimes``), remote and isolated runs (``remote``), device profiles (``profiles``), roofline
estimates (``estimate``), per-layer profiles (``layers``), the results file (``results``), the
orchestration (``profiler``), reports (``report``) and the ``edgevit profile`` commands (``cli``)."""
