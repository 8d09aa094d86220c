"""The fitting stage: plan of jobs, blocks of jobs fitted from one read (`sweep`), the solvers."""
