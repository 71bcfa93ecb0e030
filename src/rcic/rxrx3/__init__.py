"""RxRx3-core (Recursion, 2025): its files, the EFAAR benchmarks on it, and known gene relationships."""
