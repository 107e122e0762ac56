"""The domain registries: services, enrollment and admin tokens, runtime settings, retention."""
