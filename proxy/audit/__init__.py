"""The fetch log: one tamper-evident record per request (DESIGN.md, "Fetch record")."""
