"""Data modules, readers and degradations, one file per data set."""
