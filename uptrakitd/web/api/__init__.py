"""Admin and diagnostic JSON APIs."""
