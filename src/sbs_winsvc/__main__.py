from sbs_winsvc.cli import main

raise SystemExit(main())
