from chronosd.gcpause import pause_for_startup

pause_for_startup()  # until the command is under way: see end_startup_pause

from chronosd.cli import main  # noqa: E402

raise SystemExit(main())
