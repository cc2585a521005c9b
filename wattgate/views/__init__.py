"""HTTP handlers, one module per resource; they read from the Gateway and call domain code."""
