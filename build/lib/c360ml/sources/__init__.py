"""Source readers and the declarations of source tables."""
