from dissect_tui.cli import main

raise SystemExit(main())
