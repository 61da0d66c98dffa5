"""Accuracy studies on real model weights (no timing)."""
