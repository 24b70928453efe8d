"""``python -m tools.bench [technique ...]``: run the benchmarks (see tools/bench/__init__.py)."""
from tools.bench import main

raise SystemExit(main())
