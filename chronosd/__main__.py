from chronosd.cli import main

raise SystemExit(main())
