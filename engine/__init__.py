"""smartbatch core."""
