"""The recipe: typed sections (schema), reading and checking a TOML file (load), `explain`, and writing one back (dump)."""
