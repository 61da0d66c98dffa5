"""Command-line scripts of jaxprefill, run as modules from the repository root (see README.md)."""
