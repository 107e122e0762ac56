"""uptrakitd: the Uptrakit controller's security edge."""
__version__ = "0.1.0"
