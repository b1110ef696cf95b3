"""Storage: files written atomically and read with limits (files), owned output folders
and their locks (folders), checkpoints (checkpoints) and test faults at chosen points
(faults). The bottom floor: imports no other subpackage."""
