"""Training DeRIS (any preset) on referring-segmentation data: matching, losses, the loop."""
