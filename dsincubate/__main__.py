"""`python -m dsincubate ...` and `deepspeed --module dsincubate ...` run the `dsincubate` command."""
import sys

from dsincubate.cli import main

sys.exit(main())
