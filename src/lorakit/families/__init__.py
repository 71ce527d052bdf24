"""Model families: one folder each, registered in `registry`."""
