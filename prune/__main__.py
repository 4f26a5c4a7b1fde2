"""`python -m prune ...` is the same as the `prune` console script."""
from prune.cli import main

raise SystemExit(main())
