from peft_ft.cli import main

raise SystemExit(main())
