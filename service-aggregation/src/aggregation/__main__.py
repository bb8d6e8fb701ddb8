"""`python -m aggregation`."""

from aggregation.service import main

raise SystemExit(main())
