"""vmpool's drivers, one subpackage per VMMS. Each is registered as an entry
point of the group ``vmpool.drivers`` (see pyproject.toml)."""
