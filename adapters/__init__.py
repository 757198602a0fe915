"""Convert torchvision models to content-adaptive (CAD) form. Implemented in a later change."""
