"""Layer-wise evolutionary merge search (CMA-ES over per-group merge parameters), run in memory.

`merging.search.evolve.Search` prepares a search from a merge config and runs it; see docs/search.md.
"""
