"""Addresses: aliases, and the rewriting rules the routing step applies to a recipient."""
