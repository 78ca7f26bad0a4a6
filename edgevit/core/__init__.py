"""The bottom layer: errors, bundles, data files, quieting, the host's ISA. Imports nothing above it."""
