"""envd's Connect RPC stubs (process and filesystem services), vendored: see NOTICE."""
