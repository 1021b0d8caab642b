"""The vision family of mechanisms."""
