"""``fedsim bench GRID.yaml``: attack x defense grids, run serially or on Ray, resumable after a crash.

A bench directory holds ``grid.yaml`` (the validated grid), ``cells.jsonl`` (one record per finished
cell, see :mod:`fedsim.bench.store`) and ``cells/<cell_id>/`` (each cell's ordinary run directory).
Modules: :mod:`~fedsim.bench.grid` (schema), :mod:`~fedsim.bench.expand` (cells),
:mod:`~fedsim.bench.store` (records), :mod:`~fedsim.bench.runner` (resume, executors),
:mod:`~fedsim.bench.cli` (the command).
"""
