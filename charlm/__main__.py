"""`python -m charlm` (and `torchrun -m charlm`) run the command-line tool."""

from .cli import main

main()
