"""The listeners: endpoint services, the HTTPS TLS context and the server certificate behind it."""
