"""``kubectl imagebatch``: the command line for ImageBatch users (a kubectl plugin)."""
