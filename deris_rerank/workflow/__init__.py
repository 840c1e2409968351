"""The Venice-H1 workflow: extract candidate features, train a gate, evaluate."""
