"""Starting whole meshes on shared infrastructure: :mod:`meshfl.launch.slurm` fills a Slurm
allocation with a researcher and nodes (``meshfl launch slurm``)."""
