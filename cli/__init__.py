"""The `qtc` command line: parse options, call the Python API, render tables (no compile logic here)."""
