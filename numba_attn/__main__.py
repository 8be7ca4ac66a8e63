"""`python -m numba_attn ...` runs the command line."""
from .cli import main

main()
