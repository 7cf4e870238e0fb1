"""DKIM (RFC 6376): the signing keys of local domains and the signing of outgoing mail."""
