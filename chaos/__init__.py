"""Fault injection for chaos runs: a TCP fault proxy placed on cluster links."""
