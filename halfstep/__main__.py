from halfstep.cli import main

raise SystemExit(main())
