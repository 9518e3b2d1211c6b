from marginfit.tuning.cli import main

raise SystemExit(main())
