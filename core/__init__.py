"""The foundation: catalog, images, caches, run folder, errors, metrics, per-individual aggregation
and the stage protocol. Imports nothing of the engine's other packages."""
