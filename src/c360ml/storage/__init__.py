"""Where the lake lives and how it is written: Delta tables, deletion vectors, the lease."""
