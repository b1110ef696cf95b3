"""Storage: files written atomically and read with limits (files), owned output folders
and their locks (folders), checkpoints, test faults at chosen points (faults) and the strict
pydantic base of every section and saved record (strict). The bottom floor: imports no other subpackage."""
