"""CPU and GPU kernels behind one dispatch point per op."""
