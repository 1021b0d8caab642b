"""The linear family of mechanisms."""
