"""Suite-wide options."""
from __future__ import annotations


def pytest_addoption(parser):
    # The suite must stay under 20 minutes on a 2-core CI machine; an int8 ExecuTorch planted-fault
    # check takes one to two minutes per family (an export and the probe's lowering), so CI runs it
    # for LeViT and this option for all four families.
    parser.addoption("--every-family", action="store_true",
                     help="inspect's ExecuTorch planted-fault test for every family, not LeViT alone")
