from fxopt.cli import main

raise SystemExit(main())
