"""Deciding who a request is: TLS client certificates, trusted proxies and their headers (SPEC §3)."""
