"""Nsight Compute profiles of single kernel calls and their side-by-side reading."""
