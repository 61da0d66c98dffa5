"""`python -m jaxprefill ...`: the `jaxprefill` command without an installed entry point."""
import sys

from jaxprefill.cli import main

sys.exit(main())
