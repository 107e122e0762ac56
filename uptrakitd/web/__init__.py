"""The HTTP resource tree (SPEC §2, §6)."""
