"""Reports: pure functions of stored records (tables, plots, report.md, outputs side by side)."""
