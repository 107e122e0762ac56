"""The reference Uptrakit service client (`twistd -n uptrakit-agent`)."""
