"""Building blocks, one technique per file."""
