"""The service channel: Autobahn WebSockets for agents and MQTT services (SPEC §5)."""
