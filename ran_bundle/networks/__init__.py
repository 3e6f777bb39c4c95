"""RAN building blocks and the full network."""
