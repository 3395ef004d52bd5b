"""Configuration, choice types, atomic files, process defaults and where the work runs (precision, threads, Ray)."""
