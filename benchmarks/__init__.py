"""clipguard's benchmarks: the harness, its scripts and the generator of docs/benchmarks.md.

Run a script from the repository root as a module, e.g. ``python -m benchmarks.run --quick``;
benchmarks/README.md says which script answers which question.
"""
