"""How aligned parents combine: the merge rules (rules.py, one function each in a registry), the statistics
some of them read (stats.py: Gram matrices, diagonal Fisher) and the repair of a fused model's unit
statistics (repair.py)."""
