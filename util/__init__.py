"""Helpers with no domain: cache paths and hashes, progress bars, atomic files, array math, the version."""
