from wstunnel.commands import main

raise SystemExit(main())
