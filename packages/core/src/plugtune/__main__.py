from plugtune.cli import main

raise SystemExit(main())
