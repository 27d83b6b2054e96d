"""The application layer: the command line, Slurm submission, doctor, scaffolding and experiments,
built on the library (core, tokenizers, objectives, plugins) and imported by none of it."""
