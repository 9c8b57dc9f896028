"""`python -m minsdxl ...` = the `minsdxl` command (see minsdxl/cli.py)."""

from minsdxl.cli import main

raise SystemExit(main())
