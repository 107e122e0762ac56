"""The process and its start-up: the twistd entry point, boot, the composition root, lifecycle helpers."""
