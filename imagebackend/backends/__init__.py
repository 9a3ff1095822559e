"""Instance-disk backends, loaded by name through stevedore."""
