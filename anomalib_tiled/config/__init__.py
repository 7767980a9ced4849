"""Config files: their format, the components they name (class lookup), parse errors and environment checks."""
