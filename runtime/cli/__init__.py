"""The `tandem` command line: main.py (argument parsing and the run/pull/serve/plan
subcommands), store_commands.py (create, list, show, cp, rm), repl.py (the chat), bench.py
(`tandem bench`), ps.py (`tandem ps`, a client of the server), plan_report.py (`tandem plan`),
terminal.py (safe output)."""
