"""The method table (`_table`), the methods declared in it, and merging of whole pytrees."""
