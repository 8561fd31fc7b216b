"""Data files shipped with the library: the default codebook blocklist and the number-word keep list."""
