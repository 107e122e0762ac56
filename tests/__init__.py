"""uptrakitd tests (trial)."""
