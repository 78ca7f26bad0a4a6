"""Known-harmless third-party notes are dropped by message; the same loggers' other messages print."""
from __future__ import annotations

import logging

from edgevit.core.quiet import drop_known_harmless_notes


def test_only_the_known_notes_are_dropped(caplog):
    drop_known_harmless_notes()
    drop_known_harmless_notes()  # twice: still one filter per logger
    assert sum(type(f).__name__ == "_DropHarmless" for f in logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/site-packages/torchao/_C_cutlass_90a.abi3.so: nope")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'K'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
        logging.getLogger("torchao").warning("something torchao really wants you to know")
    assert [r.getMessage() for r in caplog.records] == ["something torchao really wants you to know"]
