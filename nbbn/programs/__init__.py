"""Programs built on nbbn, run from the command line (``python -m nbbn COMMAND``):
the benchmark (``bench``), the training demo (``demo``) and its NumPy MLP
(``mlp``), the example pipeline (``example``), and data-parallel training over
MPI (``python -m nbbn.programs.mpi_mlp``)."""
