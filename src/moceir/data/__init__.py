"""Data: pure degradation functions, paired transforms and datasets in upstream's folder layouts."""
