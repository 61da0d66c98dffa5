"""GPU correctness checks: each kernel or path against a float32/float64 reference."""
