"""Reports: pure functions of stored records and of plugin counts (tables, plots, report.md; ranks,
memory, quantizers)."""
