"""The modules whose METHODS make up the method table (imported by `_table` on first use)."""

MODULES = (
    "jaxmerge.methods.task_arithmetic",
    "jaxmerge.methods.interpolation",
    "jaxmerge.methods.adaptive",
    "jaxmerge.methods.subspace",
)
