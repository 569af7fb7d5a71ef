"""The shared core every package may import: parameters, errors, files, lineage, retry rules.

Imports nothing of Graft outside this package, and neither torch nor Prefect."""
