"""Every mechanism lives in its own file below this package and registers itself on import."""
