"""Addresses: aliases, virtual domains, forwarding."""
