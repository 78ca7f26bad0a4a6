"""Suite-wide options."""
from __future__ import annotations


def pytest_addoption(parser):
    # The suite must stay under 20 minutes on a 2-core CI machine. An int8 ExecuTorch bundle costs
    # inspect's tests one to two minutes each (an export and the probe's lowering), so CI inspects
    # one (LeViT's planted fault) and this option adds the rest.
    parser.addoption("--all-executorch", action="store_true",
                     help="inspect's ExecuTorch tests in full: the planted fault in every family, and a QAT bundle")
