"""hotswap.serve: one frozen base model, many adapters applied unmerged per row (see DESIGN.md)."""
