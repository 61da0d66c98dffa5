"""Code shared by the scripts."""
