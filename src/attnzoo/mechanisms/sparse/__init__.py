"""The sparse family of mechanisms."""
