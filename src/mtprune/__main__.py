from mtprune.cli import main

raise SystemExit(main())
