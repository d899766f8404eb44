"""umm merging: pure tensor math and model I/O (no network, no processes)."""

__version__ = "0.1.0"
