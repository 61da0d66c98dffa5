"""Timing benchmarks, profiles of where the time goes, and tiling sweeps."""
