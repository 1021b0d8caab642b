"""The softmax family of mechanisms."""
