"""Defences: the connection gate, network lists, and the checks a session acts on."""
