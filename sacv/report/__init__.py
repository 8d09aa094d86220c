"""What a person reads: the HTML report, its figures, the terminal summary (`sacv inspect`), the
comparison of two runs."""
